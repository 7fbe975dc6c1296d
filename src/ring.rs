//! Single-producer single-consumer ring of variable-length records over a [`RingHeader`]
//! and a power-of-two data area, both in shared memory. No syscalls here.
//!
//! A record is a 16-byte header followed by `len` body bytes; the record is padded to a
//! multiple of [`REC_ALIGN`] (64) bytes, so every record starts on its own cache line and the
//! adjacent-line prefetch brings the start of the body with the header. Header words:
//! - `+0` **commit stamp**: `!pos` (bitwise not of the record's own position), stored last,
//!   with Release. It is the commit of the record: the consumer Acquire-polls this word at
//!   its read position and accepts the record only when it equals `!read`.
//! - `+8` `len: u32` (low half) and `flags: u32` (high half), stored before the stamp.
//!
//! Positions are byte counts since the ring was created (`u64`, never wrap); the offset in
//! the data area is `pos & (capacity - 1)`. The header never wraps (records start on 64-byte
//! boundaries and the capacity is a multiple of 64); a body may wrap around the end of the
//! data area and is then copied in two pieces (the non-wrapping fast path is one copy).
//!
//! Why stale bytes never pass: positions never repeat, so a header left from an earlier lap
//! carries an older stamp. Before committing a record the producer also stores 0 into the
//! stamp word of the *next* record slot (when that slot is free space), so the word the
//! consumer polls next holds either 0, or (when the record filled the ring exactly) the
//! header of the record one lap back, never body bytes, whatever the bodies contain. A stamp
//! that is neither the expected one, 0, nor an older stamp of the same slot is [`Corrupt`].
//!
//! Protocol: the producer writes body and header words; the stamp of every record but the
//! first one of a batch is stored at once, the first one's at [`Producer::commit`]: the
//! consumer cannot get past an unstamped record, so a whole batch becomes visible with that
//! one Release store, and a producer killed before it leaves nothing visible. `write_pos` is
//! now only a **hint**, stored every quarter ring (restart, sanity checks): a restarted
//! producer starts from it and walks the stamped records to the true end. The consumer
//! copies records out and Release-stores `read_pos`; the producer re-reads it only when the
//! ring looks full.
//!
//! Both positions and every header are untrusted: the other side may be buggy or hostile.
//! Every value read is checked against the side's own private state; a violation is
//! reported as [`Corrupt`], never trusted for addressing.

use std::ptr::NonNull;

use crate::layout::RingHeader;
use crate::sync::{AtomicU64, Ordering, fence};

/// Size of a record header (commit stamp, then length and flags).
pub(crate) const REC_HDR: usize = 16;
/// Records start at multiples of this (one cache line).
pub(crate) const REC_ALIGN: usize = 64;
/// First record of a message.
pub(crate) const FIRST: u32 = 1;
/// Last record of a message (a whole message in one record is `FIRST | LAST`).
pub(crate) const LAST: u32 = 2;

/// Bytes a record with a `len`-byte body occupies.
pub(crate) const fn record_size(len: usize) -> usize {
    (REC_HDR + len + REC_ALIGN - 1) & !(REC_ALIGN - 1)
}

/// The commit stamp of a record at `pos` (never 0: positions are multiples of 64).
const fn stamp(pos: u64) -> u64 {
    !pos
}

/// The producer stores the `write_pos` hint when it lags the committed end by this fraction
/// of the capacity (a quarter): restart walks stay short and the producer line is written
/// about four times per lap instead of once per commit.
const HINT_DIVISOR: usize = 4;

/// The other side broke the ring protocol (or shared memory was overwritten).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Corrupt;

/// Raw view of one ring: header and data area.
///
/// Invariants: `hdr` points to a `RingHeader` and `data` to `cap` bytes aligned to 64, both
/// inside a mapping that outlives every `Producer`/`Consumer` built from this view; `cap` is
/// a power of two >= [`REC_ALIGN`]. Under `cfg(loom)` the data area is modelled by the
/// header's `model_data` words and `data` is not used.
#[derive(Clone, Copy)]
pub(crate) struct RawRing {
    pub hdr: NonNull<RingHeader>,
    #[cfg_attr(loom, allow(dead_code))]
    pub data: NonNull<u8>,
    pub cap: usize,
}

// SAFETY: the pointers refer to shared memory that is only accessed through atomics
// (header words) or through the SPSC protocol (bodies); moving the view between threads is
// fine.
unsafe impl Send for RawRing {}

/// A record header as read from the ring (not yet validated).
struct Hdr {
    len: u64,
    flags: u32,
}

impl RawRing {
    fn hdr(&self) -> &RingHeader {
        // SAFETY: per the type invariant the header is valid for the mapping's lifetime and
        // consists only of atomics, so a shared reference never aliases plain mutable memory.
        unsafe { self.hdr.as_ref() }
    }

    /// Data offset of position `pos`.
    fn off(&self, pos: u64) -> usize {
        (pos as usize) & (self.cap - 1)
    }

    /// The 8-byte word at data offset `off` (a multiple of 8, below `cap`).
    #[cfg(not(loom))]
    fn word(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off % 8 == 0 && off + 8 <= self.cap);
        // SAFETY: the data area is 64-aligned and `cap` bytes long (type invariant), so
        // `data + off` is an 8-aligned u64 inside it; `AtomicU64` has the size, alignment and
        // bit validity of u64. Both sides access header words only through atomics while the
        // other side may touch them (bodies are written only in free space, see try_write).
        unsafe { &*self.data.as_ptr().add(off).cast::<AtomicU64>() }
    }

    /// The 8-byte word at data offset `off`: loom models the data area as atomics.
    #[cfg(loom)]
    fn word(&self, off: usize) -> &AtomicU64 {
        &self.hdr().model_data[off / 8]
    }

    /// Read the header words of the record slot at `pos`. `None` unless the stamp says a
    /// record was committed at exactly `pos`; `Err` when the stamp is impossible there.
    fn read_hdr(&self, pos: u64) -> Result<Option<Hdr>, Corrupt> {
        let off = self.off(pos);
        let s = self.word(off).load(Ordering::Acquire);
        if s != stamp(pos) {
            // Not written yet: 0 (the producer cleared the slot), or the stamp of a record
            // of an earlier lap at this same offset. Anything else is not the producer's.
            let old = !s;
            if s == 0 || (old < pos && self.off(old) == off) {
                return Ok(None);
            }
            return Err(Corrupt);
        }
        let w = self.word(off + 8).load(Ordering::Relaxed);
        Ok(Some(Hdr { len: w & 0xffff_ffff, flags: (w >> 32) as u32 }))
    }

    /// Copy `src` into the data area at position `pos`, wrapping around the end.
    ///
    /// # Safety
    /// `[pos, pos + src.len())` must be free space owned by the producer, `src.len() <= cap`.
    #[cfg(not(loom))]
    unsafe fn copy_in(&self, pos: u64, src: &[u8]) {
        let off = self.off(pos);
        let dst = self.data.as_ptr();
        // SAFETY: off + first <= cap and src.len() - first <= cap - first, both ranges lie in
        // the data area; the caller owns them. Source is private memory, so no overlap.
        unsafe {
            if off + src.len() <= self.cap {
                std::ptr::copy_nonoverlapping(src.as_ptr(), dst.add(off), src.len());
            } else {
                let first = self.cap - off;
                std::ptr::copy_nonoverlapping(src.as_ptr(), dst.add(off), first);
                std::ptr::copy_nonoverlapping(src.as_ptr().add(first), dst, src.len() - first);
            }
        }
    }

    /// Copy `len` bytes at position `pos` out of the data area to `dst`.
    ///
    /// # Safety
    /// `[pos, pos + len)` must be committed, unconsumed bytes; `dst` valid for `len` writes.
    #[cfg(not(loom))]
    unsafe fn copy_out(&self, pos: u64, dst: *mut u8, len: usize) {
        let off = self.off(pos);
        let src = self.data.as_ptr();
        // SAFETY: as in copy_in, both ranges are inside the data area; dst is private memory.
        unsafe {
            if off + len <= self.cap {
                std::ptr::copy_nonoverlapping(src.add(off), dst, len);
            } else {
                let first = self.cap - off;
                std::ptr::copy_nonoverlapping(src.add(off), dst, first);
                std::ptr::copy_nonoverlapping(src, dst.add(first), len - first);
            }
        }
    }

    /// Loom: body bytes go through Relaxed word accesses (one per word touched), so a
    /// consumer that reads a body without synchronizing with its producer can observe old
    /// words.
    ///
    /// # Safety
    /// As the non-loom version.
    #[cfg(loom)]
    unsafe fn copy_in(&self, pos: u64, src: &[u8]) {
        let mut i = 0;
        while i < src.len() {
            let off = self.off(pos + i as u64);
            let (base, skip) = (off & !7, off & 7);
            let n = (8 - skip).min(src.len() - i);
            let w = self.word(base);
            let mut bytes = if n == 8 { [0u8; 8] } else { w.load(Ordering::Relaxed).to_le_bytes() };
            bytes[skip..skip + n].copy_from_slice(&src[i..i + n]);
            w.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
            i += n;
        }
    }

    /// Loom: see `copy_in`.
    ///
    /// # Safety
    /// As the non-loom version.
    #[cfg(loom)]
    unsafe fn copy_out(&self, pos: u64, dst: *mut u8, len: usize) {
        let mut i = 0;
        while i < len {
            let off = self.off(pos + i as u64);
            let (base, skip) = (off & !7, off & 7);
            let n = (8 - skip).min(len - i);
            let bytes = self.word(base).load(Ordering::Relaxed).to_le_bytes();
            // SAFETY: dst is valid for len writes (caller); i + n <= len.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr().add(skip), dst.add(i), n) };
            i += n;
        }
    }
}

/// Validate a header read at `pos` against the consumer position `read` (the producer can
/// only have written up to `read + cap`): its record end, or `Corrupt`.
fn record_end(ring: &RawRing, h: &Hdr, pos: u64, read: u64) -> Result<u64, Corrupt> {
    if h.len > (ring.cap - REC_HDR) as u64 || h.flags & !(FIRST | LAST) != 0 {
        return Err(Corrupt);
    }
    let end = pos.checked_add(record_size(h.len as usize) as u64).ok_or(Corrupt)?;
    if end - read > ring.cap as u64 {
        return Err(Corrupt);
    }
    Ok(end)
}

/// The writing end. At most one `Producer` per ring exists in the whole system: the slot
/// lock of the producing slot guarantees it across processes.
pub(crate) struct Producer {
    ring: RawRing,
    /// Next byte to write (ahead of `committed` while a batch is open).
    write: u64,
    /// End of the last committed record. While a batch is open, the record at `committed`
    /// is the one whose stamp is held back until [`Producer::commit`].
    committed: u64,
    /// Last `read_pos` seen; `write - cached_read <= cap` always.
    cached_read: u64,
    /// Messages written (committed or not).
    published: u64,
    /// Last value stored to the `write_pos` hint.
    hinted: u64,
}

impl Producer {
    /// Resume producing on `ring`: from the `write_pos` hint (or the consumer's position if
    /// that is further), walking every record stamped since to the true committed end. A
    /// predecessor killed mid-batch left its batch's first record unstamped, so its
    /// uncommitted records are not walked and are overwritten.
    pub(crate) fn new(ring: RawRing) -> Result<Self, Corrupt> {
        let h = ring.hdr();
        let hint = h.producer.write_pos.load(Ordering::Acquire);
        let read = h.consumer.read_pos.load(Ordering::Acquire);
        let cap = ring.cap as u64;
        let a = REC_ALIGN as u64;
        // The hint never passes the committed end (<= read + cap) and lags it by less than
        // a quarter ring plus one batch (< 2 cap).
        if hint % a != 0 || read % a != 0 || hint > read.saturating_add(cap) || read > hint.saturating_add(2 * cap) {
            return Err(Corrupt);
        }
        let mut published = h.producer.published.load(Ordering::Relaxed);
        let mut pos = hint.max(read);
        while let Some(rec) = ring.read_hdr(pos)? {
            pos = record_end(&ring, &rec, pos, read)?;
            if rec.flags & LAST != 0 {
                published = published.wrapping_add(1);
            }
        }
        Ok(Producer { ring, write: pos, committed: pos, cached_read: read, published, hinted: hint })
    }

    /// Free bytes, re-reading the consumer's position. `Err` when that position is
    /// impossible (behind the last one seen, or ahead of what was committed).
    pub(crate) fn refresh(&mut self) -> Result<usize, Corrupt> {
        let read = self.ring.hdr().consumer.read_pos.load(Ordering::Acquire);
        if read < self.cached_read || read > self.committed {
            return Err(Corrupt);
        }
        self.cached_read = read;
        Ok(self.free_cached())
    }

    fn free_cached(&self) -> usize {
        self.ring.cap - (self.write - self.cached_read) as usize
    }

    /// Largest body one record can carry in this ring.
    pub(crate) fn max_body(&self) -> usize {
        self.ring.cap - REC_HDR
    }

    /// Free bytes for the body of a new record right now (refreshing the cached position
    /// only if the cache says the ring is too full for `want` body bytes).
    pub(crate) fn body_room(&mut self, want: usize) -> Result<usize, Corrupt> {
        let mut free = self.free_cached();
        if free < record_size(want) {
            free = self.refresh()?;
        }
        // `free` is a multiple of REC_ALIGN, so a body of `free - REC_HDR` fills it exactly.
        Ok(free.saturating_sub(REC_HDR))
    }

    /// Append one record whose body is the concatenation of `parts`, uncommitted.
    /// Returns false (writing nothing) when it does not fit right now.
    pub(crate) fn try_write(&mut self, flags: u32, parts: &[&[u8]]) -> Result<bool, Corrupt> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let need = record_size(len);
        if need > self.ring.cap {
            return Ok(false);
        }
        if need > self.free_cached() && need > self.refresh()? {
            return Ok(false);
        }
        // Positions come from shared memory: one near u64::MAX is corrupt, not a panic.
        let Some(end) = self.write.checked_add(need as u64) else { return Err(Corrupt) };
        let mut pos = self.write + REC_HDR as u64;
        // SAFETY: need <= free space, so [write, write + need) is owned by the producer; each
        // part is copied at increasing positions inside that range.
        unsafe {
            for p in parts {
                self.ring.copy_in(pos, p);
                pos += p.len() as u64;
            }
        }
        self.seal(flags, len, end);
        Ok(true)
    }

    /// Free space for the body of one record at the write position that does not wrap
    /// around the end of the data area, to build the body in place (then
    /// [`Producer::write_reserved`]): at least `min` bytes, or `None` when that much is not
    /// free and contiguous right now. Nothing is visible to the consumer until the record is
    /// written and committed; a reservation that is never written costs nothing.
    #[cfg(not(loom))]
    pub(crate) fn reserve(&mut self, min: usize) -> Result<Option<&mut [std::mem::MaybeUninit<u8>]>, Corrupt> {
        let off = self.ring.off(self.write);
        let to_end = self.ring.cap - off;
        let need = record_size(min);
        let mut free = self.free_cached();
        if free.min(to_end) < need {
            free = self.refresh()?;
        }
        let room = free.min(to_end);
        if room < need || self.write.checked_add(room as u64).is_none() {
            return Ok(None);
        }
        // SAFETY: [write, write + room) is free space owned by the producer (room <= free)
        // and does not wrap (room <= cap - off), so [off + REC_HDR, off + room) lies inside
        // the data area; the consumer does not read it before the record's stamp is stored.
        // The slice's lifetime is tied to `&mut self`: no other producer call can run while
        // it is alive.
        Ok(Some(unsafe {
            std::slice::from_raw_parts_mut(self.ring.data.as_ptr().add(off + REC_HDR).cast(), room - REC_HDR)
        }))
    }

    /// Loom models the data area as atomics: nothing can be built in place, so callers
    /// always take their copying path (which the models check).
    #[cfg(loom)]
    pub(crate) fn reserve(&mut self, _min: usize) -> Result<Option<&mut [std::mem::MaybeUninit<u8>]>, Corrupt> {
        Ok(None)
    }

    /// Append (uncommitted, as [`Producer::try_write`]) the record whose `len` body bytes
    /// were just built in the space [`Producer::reserve`] returned.
    ///
    /// # Panics
    /// If `len` exceeds that space (a caller bug: the record would cover unread bytes).
    pub(crate) fn write_reserved(&mut self, flags: u32, len: usize) {
        let need = record_size(len);
        assert!(need <= self.free_cached() && self.ring.off(self.write) + need <= self.ring.cap, "beyond reserve");
        // No overflow: `reserve` checked write + room, and need <= room.
        self.seal(flags, len, self.write + need as u64);
    }

    /// Write the header words of the record at `write` (body of `len` bytes already in place,
    /// record ending at `end`) and advance: stamped at once unless it opens the batch.
    fn seal(&mut self, flags: u32, len: usize, end: u64) {
        let off = self.ring.off(self.write);
        if end - self.cached_read < self.ring.cap as u64 {
            // The next record slot is free space: clear its stamp word, so the consumer
            // never finds old bytes there (see the module docs).
            self.ring.word(self.ring.off(end)).store(0, Ordering::Relaxed);
        }
        self.ring.word(off + 8).store(len as u64 | (u64::from(flags) << 32), Ordering::Relaxed);
        if self.write != self.committed {
            // Not the first record of the batch: invisible until that one is stamped.
            self.ring.word(off).store(stamp(self.write), Ordering::Release);
        }
        self.write = end;
        if flags & LAST != 0 {
            self.published = self.published.wrapping_add(1);
        }
    }

    /// Publish everything written since the last commit: one Release store of the stamp of
    /// the batch's first record. Returns whether anything was published.
    pub(crate) fn commit(&mut self) -> bool {
        if self.write == self.committed {
            return false;
        }
        let first = self.committed;
        self.ring.word(self.ring.off(first)).store(stamp(first), Ordering::Release);
        self.committed = self.write;
        if self.committed - self.hinted >= (self.ring.cap / HINT_DIVISOR) as u64 {
            self.store_hint();
        }
        true
    }

    /// Store the `write_pos` hint and the `published` counter now.
    pub(crate) fn store_hint(&mut self) {
        let p = &self.ring.hdr().producer;
        p.published.store(self.published, Ordering::Relaxed);
        p.write_pos.store(self.committed, Ordering::Release);
        self.hinted = self.committed;
    }

    /// Ask the consumer to wake us when it frees space, then re-check: returns the body
    /// room available after the re-check. If it is still too small, the consumer sees the
    /// flag at its next release (Relaxed pre-check) or, at the latest, at the fenced check
    /// it owes after that release (`Consumer::settle`: SeqCst fences on both sides, so no
    /// lost request; the consumer pays it before it sleeps, or within a few drain passes).
    pub(crate) fn request_space(&mut self, want: usize) -> Result<usize, Corrupt> {
        self.ring.hdr().producer.want_space.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.refresh()?;
        self.body_room(want)
    }

    /// Count an event dropped for this consumer; it will get a `lost` notice.
    pub(crate) fn add_lost(&mut self, n: u64) {
        let lost = &self.ring.hdr().producer.lost;
        // Saturating: the counter lives in shared memory and may hold anything.
        lost.store(lost.load(Ordering::Relaxed).saturating_add(n), Ordering::Release);
    }

    /// Messages written but not yet consumed.
    pub(crate) fn depth(&self) -> u64 {
        let consumed = self.ring.hdr().consumer.consumed.load(Ordering::Relaxed);
        self.published.saturating_sub(consumed)
    }
}

/// The SeqCst fence that lets [`Consumer::settle`] pay the want-space checks owed by
/// every release before it (one fence for any number of rings).
pub(crate) fn settle_fence() {
    fence(Ordering::SeqCst);
}

/// What [`Consumer::peek`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordInfo {
    pub len: usize,
    pub flags: u32,
}

/// The reading end. At most one per ring (the consuming slot's lock).
pub(crate) struct Consumer {
    ring: RawRing,
    read: u64,
    released: u64,
    consumed: u64,
    /// `read_pos` was stored by [`Consumer::commit_read`] and the want-space pre-check
    /// (a Relaxed load) was not made since: the next [`Consumer::release`] makes it.
    unchecked: bool,
    /// `read_pos` was stored since the last *fenced* want-space check: the check
    /// [`Consumer::settle`] makes after a SeqCst fence is owed (see [`Consumer::release`]).
    owed: bool,
    /// A corrupt record sits at `read` and no `write_pos` hint past it was seen yet: report
    /// nothing until the hint moves past it (see [`Consumer::skip_all`]).
    stuck: bool,
}

impl Consumer {
    /// Resume consuming from the stored `read_pos`.
    pub(crate) fn new(ring: RawRing) -> Result<Self, Corrupt> {
        let h = ring.hdr();
        let read = h.consumer.read_pos.load(Ordering::Acquire);
        let hint = h.producer.write_pos.load(Ordering::Acquire);
        let cap = ring.cap as u64;
        // As in Producer::new: hint <= committed <= read + cap, committed - hint < 2 cap.
        if read % REC_ALIGN as u64 != 0
            || hint % REC_ALIGN as u64 != 0
            || hint > read.saturating_add(cap)
            || read > hint.saturating_add(2 * cap)
        {
            return Err(Corrupt);
        }
        let consumed = h.consumer.consumed.load(Ordering::Relaxed);
        Ok(Consumer { ring, read, released: read, consumed, unchecked: false, owed: false, stuck: false })
    }

    /// Is a committed record waiting at the read position? One Acquire load of its stamp.
    pub(crate) fn has_data(&mut self) -> bool {
        if self.stuck {
            return self.unstick();
        }
        self.ring.word(self.ring.off(self.read)).load(Ordering::Acquire) == stamp(self.read)
    }

    /// Look at the next record without consuming it.
    pub(crate) fn peek(&mut self) -> Result<Option<RecordInfo>, Corrupt> {
        if self.stuck && !self.unstick() {
            return Ok(None);
        }
        let Some(h) = self.ring.read_hdr(self.read)? else { return Ok(None) };
        // The producer writes only below released + cap.
        record_end(&self.ring, &h, self.read, self.released)?;
        Ok(Some(RecordInfo { len: h.len as usize, flags: h.flags }))
    }

    /// Consume the record `info` (from the last `peek`), copying its body to `dst`
    /// (`dst` must have room for `info.len` bytes) or discarding it when `dst` is None.
    ///
    /// # Safety
    /// `info` must be what the last `peek` returned; `dst`, if any, valid for `info.len`
    /// byte writes.
    pub(crate) unsafe fn consume(&mut self, info: RecordInfo, dst: Option<*mut u8>) {
        if let Some(dst) = dst {
            // SAFETY: peek checked that the record is stamped (committed) and lies within
            // cap of the released position, so the producer does not write it.
            unsafe { self.ring.copy_out(self.read + REC_HDR as u64, dst, info.len) };
        }
        // peek checked that this addition does not overflow (record_end).
        self.read += record_size(info.len) as u64;
        if info.flags & LAST != 0 {
            self.consumed = self.consumed.wrapping_add(1);
        }
    }

    /// Ask the cache for the line of the record slot after `info` (from the last `peek`):
    /// the stamp read next. Its transfer from the producer's core then overlaps with the
    /// copy and the callbacks of this record instead of following them (a ping-pong reads
    /// that stamp, still 0, before replying). A hint only: it reads nothing.
    #[inline]
    pub(crate) fn prefetch_next(&self, info: RecordInfo) {
        #[cfg(all(target_arch = "x86_64", not(loom)))]
        {
            let next = self.ring.off(self.read.wrapping_add(record_size(info.len) as u64));
            // SAFETY: `next` < cap, so the address is inside the data area (type invariant);
            // a prefetch never faults and has no architectural effect.
            unsafe {
                let p = self.ring.data.as_ptr().add(next);
                std::arch::x86_64::_mm_prefetch(p.cast::<i8>(), std::arch::x86_64::_MM_HINT_T0);
            }
        }
        #[cfg(not(all(target_arch = "x86_64", not(loom))))]
        let _ = info;
    }

    /// Drop everything committed so far (after [`Corrupt`]): jump to the producer's
    /// `write_pos` hint when it is past the read position; otherwise report nothing until it
    /// is (the producer stores it at least every quarter ring, so a live producer gets us
    /// going again, and its full ring makes it count its drops meanwhile).
    pub(crate) fn skip_all(&mut self) {
        self.read = self.released;
        self.stuck = true;
        self.unstick();
    }

    /// While stuck: jump to the hint if it is a plausible position past us.
    fn unstick(&mut self) -> bool {
        let w = self.ring.hdr().producer.write_pos.load(Ordering::Acquire);
        if w > self.read && w - self.released <= self.ring.cap as u64 && w % REC_ALIGN as u64 == 0 {
            self.read = w;
            self.stuck = false;
            return true;
        }
        false
    }

    /// Give consumed space back to the producer: one Release store of `read_pos`, then a
    /// Relaxed look at `want_space`. Returns true when the producer asked to be woken (the
    /// caller wakes it). No fence: a request the producer stores concurrently may be missed
    /// here (its store and ours may each be invisible to the other's load), so the fenced
    /// check is left **owed** ([`Consumer::owes_check`]) and paid by [`Consumer::settle`]
    /// after the caller's next SeqCst fence: the one [`crate::notify::arm`] issues before
    /// the consumer sleeps, or one every few drain passes while it never sleeps.
    pub(crate) fn release(&mut self) -> bool {
        self.commit_read();
        if !std::mem::take(&mut self.unchecked) {
            return false;
        }
        let want = &self.ring.hdr().producer.want_space;
        want.load(Ordering::Relaxed) == 1 && want.swap(0, Ordering::AcqRel) == 1
    }

    /// A release since the last [`Consumer::settle`] left the fenced want-space check owed.
    pub(crate) fn owes_check(&self) -> bool {
        self.owed
    }

    /// Pay the owed want-space check: true when the producer asked to be woken (the caller
    /// wakes it). The caller must have issued a SeqCst fence ([`settle_fence`], or
    /// [`crate::notify::arm`]) after its last [`Consumer::release`]; that fence against the
    /// producer's fence in [`Producer::request_space`] makes at least one side see the
    /// other's store: the producer sees the freed space, or this load sees the request.
    pub(crate) fn settle(&mut self) -> bool {
        if !std::mem::take(&mut self.owed) {
            return false;
        }
        let want = &self.ring.hdr().producer.want_space;
        want.load(Ordering::Relaxed) == 1 && want.swap(0, Ordering::AcqRel) == 1
    }

    /// Publish the consumed position now, before the caller runs callbacks on what it
    /// consumed: a successor of a consumer killed inside a callback resumes after that
    /// message and never sees it again. One Release store; the want-space check is left to
    /// the next [`Consumer::release`] (and its fenced form to [`Consumer::settle`]).
    pub(crate) fn commit_read(&mut self) {
        if self.read == self.released {
            return;
        }
        let c = &self.ring.hdr().consumer;
        c.consumed.store(self.consumed, Ordering::Relaxed);
        c.read_pos.store(self.read, Ordering::Release);
        self.released = self.read;
        self.unchecked = true;
        self.owed = true;
    }

    /// Events the producer dropped for us and not yet reported; marks them reported.
    pub(crate) fn take_lost(&mut self) -> u64 {
        let h = self.ring.hdr();
        let lost = h.producer.lost.load(Ordering::Acquire);
        let seen = h.consumer.lost_seen.load(Ordering::Relaxed);
        if lost > seen {
            h.consumer.lost_seen.store(lost, Ordering::Relaxed);
            lost - seen
        } else {
            if lost < seen {
                // A restarted producer region or a corrupt counter: resynchronize silently
                // downward; nothing new was lost.
                h.consumer.lost_seen.store(lost, Ordering::Relaxed);
            }
            0
        }
    }

    /// Messages committed but not consumed (statistics): walks the stamped records from
    /// the read position (at most one ring's worth), so it needs no counter the producer
    /// would have to store per commit.
    pub(crate) fn depth(&self) -> u64 {
        let mut n = 0;
        let mut pos = self.read;
        while let Ok(Some(h)) = self.ring.read_hdr(pos) {
            let Ok(end) = record_end(&self.ring, &h, pos, self.released) else { break };
            n += u64::from(h.flags & LAST != 0);
            pos = end;
        }
        n
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A ring in private memory with the same layout as in the region.
    pub(crate) struct TestRing {
        _mem: Vec<u128>,
        pub raw: RawRing,
    }

    pub(crate) fn test_ring(cap: usize) -> TestRing {
        let words = (std::mem::size_of::<RingHeader>() + cap).div_ceil(16) + 8;
        let mut mem = vec![0u128; words];
        let base = mem.as_mut_ptr() as *mut u8;
        // align to 128 for the header
        let off = base.align_offset(128);
        assert!(off + std::mem::size_of::<RingHeader>() + cap <= words * 16);
        // SAFETY: the offsets stay inside `mem`, which lives as long as the TestRing.
        let (hdr, data) = unsafe {
            let h = base.add(off);
            (h, h.add(std::mem::size_of::<RingHeader>()))
        };
        TestRing {
            _mem: mem,
            raw: RawRing { hdr: NonNull::new(hdr as *mut RingHeader).unwrap(), data: NonNull::new(data).unwrap(), cap },
        }
    }

    impl TestRing {
        fn hdr(&self) -> &RingHeader {
            // SAFETY: test-only access to the private header.
            unsafe { self.raw.hdr.as_ref() }
        }

        /// Write a record header (stamp, len, flags) at data offset `off`, as a peer could.
        fn poke_hdr(&self, off: usize, stamp_word: u64, len: u32, flags: u32) {
            self.raw.word(off + 8).store(u64::from(len) | (u64::from(flags) << 32), Ordering::Relaxed);
            self.raw.word(off).store(stamp_word, Ordering::Release);
        }
    }

    fn pop(c: &mut Consumer) -> Option<(u32, Vec<u8>)> {
        let info = c.peek().unwrap()?;
        let mut v = vec![0u8; info.len];
        // SAFETY: info from peek, v has len bytes.
        unsafe { c.consume(info, Some(v.as_mut_ptr())) };
        Some((info.flags, v))
    }

    #[test]
    fn wrap_around_keeps_every_byte() {
        let r = test_ring(256);
        let mut p = Producer::new(r.raw).unwrap();
        let mut c = Consumer::new(r.raw).unwrap();
        let mut wrapped = 0;
        // Varied sizes put records at every 64-byte offset; bodies over 48 bytes that start
        // at offset 192 straddle the end of the data area.
        for round in 0..300u32 {
            let len = (round as usize * 37) % 200;
            let body: Vec<u8> = (0..len).map(|i| (i as u32 + round) as u8).collect();
            wrapped += usize::from(r.raw.off(p.write) + REC_HDR + len > 256);
            assert!(p.try_write(FIRST | LAST, &[&body[..len / 2], &body[len / 2..]]).unwrap());
            assert!(p.commit());
            let (flags, got) = pop(&mut c).expect("record");
            assert_eq!(flags, FIRST | LAST);
            assert_eq!(got, body, "round {round}");
            assert!(pop(&mut c).is_none());
            c.release();
        }
        assert!(wrapped > 20, "only {wrapped} bodies wrapped");
    }

    #[test]
    fn records_are_line_aligned() {
        let r = test_ring(4096);
        let mut p = Producer::new(r.raw).unwrap();
        for len in [0, 1, 47, 48, 49, 100, 111, 112, 113] {
            let before = p.write;
            assert!(p.try_write(FIRST | LAST, &[&vec![1u8; len]]).unwrap());
            assert_eq!(p.write - before, (REC_HDR + len).div_ceil(64) as u64 * 64, "len {len}");
            assert_eq!(p.write % 64, 0);
        }
    }

    #[test]
    fn full_ring_refuses_then_accepts_after_release() {
        let r = test_ring(128);
        let mut p = Producer::new(r.raw).unwrap();
        let mut c = Consumer::new(r.raw).unwrap();
        assert!(p.try_write(FIRST | LAST, &[&[1u8; 48]]).unwrap()); // 64 bytes
        assert!(p.try_write(FIRST | LAST, &[&[2u8; 40]]).unwrap()); // 128 bytes: full
        assert!(!p.try_write(FIRST | LAST, &[&[3u8; 1]]).unwrap());
        assert!(!p.try_write(FIRST | LAST, &[&[3u8; 200]]).unwrap(), "larger than the ring");
        p.commit();
        assert_eq!(p.depth(), 2);
        assert_eq!(c.depth(), 2);
        assert_eq!(pop(&mut c).unwrap().1, vec![1u8; 48]);
        // Not released yet: still full for the producer.
        assert!(!p.try_write(FIRST | LAST, &[&[3u8; 1]]).unwrap());
        c.release();
        assert!(p.try_write(FIRST | LAST, &[&[3u8; 1]]).unwrap());
        p.commit();
        assert_eq!(pop(&mut c).unwrap().1, vec![2u8; 40]);
        // The slot of position 128 held the stamp of position 0 until record 3 was written.
        assert_eq!(pop(&mut c).unwrap().1, vec![3u8; 1]);
        assert!(pop(&mut c).is_none());
    }

    #[test]
    fn uncommitted_records_are_invisible() {
        let r = test_ring(256);
        let mut p = Producer::new(r.raw).unwrap();
        let mut c = Consumer::new(r.raw).unwrap();
        // A batch of two: the second record's stamp is stored at once, the first one's only
        // at commit, so neither is visible.
        assert!(p.try_write(FIRST | LAST, &[b"abc"]).unwrap());
        assert!(p.try_write(FIRST | LAST, &[b"def"]).unwrap());
        assert_eq!(r.raw.word(64).load(Ordering::Relaxed), stamp(64));
        assert!(!c.has_data());
        assert!(pop(&mut c).is_none());
        assert_eq!(c.depth(), 0);
        // The producer dies here. Its successor resumes at the committed end (0) and its
        // first record (64 bytes) ends where the dead batch's second record was: it clears
        // that stamp before committing, so "def" never shows.
        let mut p2 = Producer::new(r.raw).unwrap();
        assert_eq!(p2.write, 0);
        assert!(p2.try_write(FIRST | LAST, &[b"xyz"]).unwrap());
        p2.commit();
        assert_eq!(pop(&mut c).unwrap().1, b"xyz");
        assert!(pop(&mut c).is_none(), "a record of the dead batch became visible");
        assert!(p2.try_write(FIRST | LAST, &[b"uvw"]).unwrap());
        p2.commit();
        assert_eq!(pop(&mut c).unwrap().1, b"uvw");
        // The first producer's cached view is stale but harmless: it is never used again.
        let _ = p.max_body();
    }

    #[test]
    fn restarted_producer_walks_past_the_lazy_hint() {
        let r = test_ring(4096);
        let mut p = Producer::new(r.raw).unwrap();
        for i in 0..5u8 {
            assert!(p.try_write(FIRST | LAST, &[&[i; 10]]).unwrap());
            p.commit();
        }
        // 5 records of 64 bytes: less than a quarter ring, so no hint yet.
        assert_eq!(r.hdr().producer.write_pos.load(Ordering::Relaxed), 0);
        let mut c = Consumer::new(r.raw).unwrap();
        assert_eq!(c.depth(), 5);
        assert_eq!(pop(&mut c).unwrap().1, [0u8; 10]);
        assert_eq!(pop(&mut c).unwrap().1, [1u8; 10]);
        c.release();
        // The consumer is past the hint now; a successor resumes after record 4, not at 0.
        let mut p2 = Producer::new(r.raw).unwrap();
        assert_eq!(p2.write, 5 * 64);
        assert!(p2.try_write(FIRST | LAST, &[&[9u8; 10]]).unwrap());
        p2.commit();
        for want in [2u8, 3, 4, 9] {
            assert_eq!(pop(&mut c).unwrap().1, [want; 10]);
        }
        assert!(pop(&mut c).is_none());
        // The hint is stored once the committed end is a quarter ring past it.
        for _ in 0..16 {
            assert!(p2.try_write(FIRST | LAST, &[&[0u8; 1]]).unwrap());
            p2.commit();
            c.peek().unwrap();
            pop(&mut c);
            c.release();
        }
        let hint = r.hdr().producer.write_pos.load(Ordering::Relaxed);
        assert!(hint >= 1024 && hint <= p2.committed, "{hint}");
    }

    #[test]
    fn stale_lap_bytes_are_not_accepted() {
        let r = test_ring(128);
        let mut p = Producer::new(r.raw).unwrap();
        let mut c = Consumer::new(r.raw).unwrap();
        // Fill the ring exactly: no next slot to clear, the slot of position 128 keeps the
        // complete, valid-looking header of position 0 (same length, same flags).
        assert!(p.try_write(FIRST | LAST, &[&[7u8; 48]]).unwrap());
        assert!(p.try_write(FIRST | LAST, &[&[8u8; 48]]).unwrap());
        p.commit();
        assert_eq!(pop(&mut c).unwrap().1, [7u8; 48]);
        assert_eq!(pop(&mut c).unwrap().1, [8u8; 48]);
        c.release();
        assert_eq!(r.raw.word(0).load(Ordering::Relaxed), stamp(0));
        assert_eq!(c.peek(), Ok(None), "the header of lap 0 was taken for position 128");
        assert!(!c.has_data());
        assert_eq!(c.depth(), 0);
        // Any older lap of the same slot is equally "not yet".
        r.poke_hdr(64, stamp(64), 48, FIRST | LAST);
        assert!(p.try_write(FIRST | LAST, &[&[9u8; 48]]).unwrap());
        p.commit();
        assert_eq!(pop(&mut c).unwrap().1, [9u8; 48]);
        assert_eq!(c.peek(), Ok(None));
    }

    #[test]
    fn a_wrong_stamp_is_corrupt_not_a_spin() {
        let r = test_ring(256);
        let mut c = Consumer::new(r.raw).unwrap();
        for bad in [stamp(64), stamp(256), stamp(8), stamp(1 << 40), 1] {
            r.poke_hdr(0, bad, 8, FIRST | LAST);
            assert_eq!(c.peek(), Err(Corrupt), "stamp {bad:#x}");
            assert!(!c.has_data());
        }
        // A correct stamp with an impossible length or unknown flags.
        r.poke_hdr(0, stamp(0), 241, FIRST | LAST);
        assert_eq!(c.peek(), Err(Corrupt));
        r.poke_hdr(0, stamp(0), u32::MAX, FIRST | LAST);
        assert_eq!(c.peek(), Err(Corrupt));
        r.poke_hdr(0, stamp(0), 8, 4);
        assert_eq!(c.peek(), Err(Corrupt));
        r.poke_hdr(0, stamp(0), 240, LAST);
        assert_eq!(c.peek().unwrap().unwrap(), RecordInfo { len: 240, flags: LAST });
        // A position near 2^64 with a record that would run past it.
        let top = u64::MAX - 63;
        r.hdr().consumer.read_pos.store(top, Ordering::Relaxed);
        r.hdr().producer.write_pos.store(top, Ordering::Relaxed);
        let mut c = Consumer::new(r.raw).unwrap();
        r.poke_hdr(r.raw.off(top), stamp(top), 8, FIRST | LAST);
        assert_eq!(c.peek(), Err(Corrupt));
        assert_eq!(Producer::new(r.raw).err(), Some(Corrupt));
    }

    #[test]
    fn corrupt_positions_are_detected() {
        let r = test_ring(256);
        let mut p = Producer::new(r.raw).unwrap();
        let h = r.hdr();
        // A hint beyond anything the consumer could have left room for.
        h.producer.write_pos.store(1 << 40, Ordering::Release);
        assert!(Consumer::new(r.raw).is_err());
        assert!(Producer::new(r.raw).is_err());
        h.producer.write_pos.store(8, Ordering::Release);
        assert!(Consumer::new(r.raw).is_err(), "unaligned hint");
        h.producer.write_pos.store(0, Ordering::Release);
        let mut c = Consumer::new(r.raw).unwrap();
        // A stamped header claiming a body longer than the ring: skipped, and the consumer
        // reports nothing (instead of the same error again) until the hint moves past it.
        r.poke_hdr(0, stamp(0), 1000, FIRST | LAST);
        assert_eq!(c.peek(), Err(Corrupt));
        c.skip_all();
        assert_eq!(c.peek(), Ok(None));
        assert!(!c.has_data());
        h.producer.write_pos.store(128, Ordering::Release);
        r.poke_hdr(128, stamp(128), 3, FIRST | LAST);
        assert!(c.has_data());
        assert_eq!(c.peek().unwrap().unwrap().len, 3);
        c.release();
        h.consumer.read_pos.store(1 << 50, Ordering::Release);
        assert_eq!(p.refresh(), Err(Corrupt));
        assert!(Producer::new(r.raw).is_err());
        // A successor walks the stamped records from the hint; an impossible one on the way
        // makes the ring corrupt for it.
        h.consumer.read_pos.store(128, Ordering::Release);
        assert_eq!(Producer::new(r.raw).unwrap().write, 192);
        r.poke_hdr(192, stamp(192), 1000, FIRST | LAST);
        assert!(Producer::new(r.raw).is_err());
    }

    #[test]
    fn lost_counter_reported_once() {
        let r = test_ring(64);
        let mut p = Producer::new(r.raw).unwrap();
        let mut c = Consumer::new(r.raw).unwrap();
        assert_eq!(c.take_lost(), 0);
        p.add_lost(3);
        assert_eq!(c.take_lost(), 3);
        assert_eq!(c.take_lost(), 0);
        p.add_lost(1);
        assert_eq!(Consumer::new(r.raw).unwrap().take_lost(), 1);
    }

    #[test]
    fn want_space_flag_is_returned_once() {
        let r = test_ring(64);
        let mut p = Producer::new(r.raw).unwrap();
        let mut c = Consumer::new(r.raw).unwrap();
        assert!(p.try_write(FIRST | LAST, &[&[0u8; 48]]).unwrap());
        p.commit();
        assert_eq!(p.request_space(8).unwrap(), 0);
        pop(&mut c).unwrap();
        assert!(c.release());
        assert!(!c.release());
        assert_eq!(p.body_room(8).unwrap(), 48);
    }
}

#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use loom::thread;
    use std::sync::Arc;

    /// The ring header (its `model_data` words are the data area) and a dummy data pointer.
    struct Shared {
        hdr: Box<RingHeader>,
        cap: usize,
    }

    fn shared(cap: usize) -> Arc<Shared> {
        Arc::new(Shared { hdr: Box::new(RingHeader::new_for_model()), cap })
    }

    fn raw(s: &Shared) -> RawRing {
        assert!(s.cap <= s.hdr.model_data.len() * 8);
        RawRing { hdr: NonNull::from(&*s.hdr), data: NonNull::dangling(), cap: s.cap }
    }

    fn pop(c: &mut Consumer) -> Option<Vec<u8>> {
        let info = c.peek().expect("an honest producer never looks corrupt")?;
        let mut v = vec![0u8; info.len];
        // SAFETY: info from peek; v holds info.len bytes.
        unsafe { c.consume(info, Some(v.as_mut_ptr())) };
        Some(v)
    }

    /// FIFO, no overrun, no record lost, duplicated, torn or stale, with a full ring and a
    /// second lap (the third record reuses the slot of the first one, whose complete header
    /// stays there while the ring is full).
    #[test]
    fn spsc_records_in_order() {
        loom::model(|| {
            let s = shared(128);
            let s2 = s.clone();
            let prod = thread::spawn(move || {
                let mut p = Producer::new(raw(&s2)).unwrap();
                let mut i = 1u8;
                while i <= 3 {
                    if p.try_write(FIRST | LAST, &[&[i; 8]]).unwrap() {
                        p.commit();
                        i += 1;
                    } else {
                        thread::yield_now();
                    }
                }
            });
            let mut c = Consumer::new(raw(&s)).unwrap();
            let mut got = 1u8;
            while got <= 3 {
                match pop(&mut c) {
                    Some(v) => {
                        assert_eq!(v, [got; 8], "record {got} torn or stale");
                        got += 1;
                        c.release();
                    }
                    None => thread::yield_now(),
                }
            }
            prod.join().unwrap();
            assert_eq!(pop(&mut c), None);
        });
    }

    /// A batch becomes visible whole or not at all; a producer that dies before committing
    /// leaves nothing visible, and the records its batch stamped early never show up after
    /// a successor reuses the positions.
    #[test]
    fn dead_batch_stays_invisible() {
        loom::model(|| {
            let s = shared(256);
            let s2 = s.clone();
            let prod = thread::spawn(move || {
                {
                    // Killed before its commit.
                    let mut dead = Producer::new(raw(&s2)).unwrap();
                    assert!(dead.try_write(FIRST | LAST, &[&[0xdd; 8]]).unwrap());
                    assert!(dead.try_write(FIRST | LAST, &[&[0xee; 8]]).unwrap());
                }
                let mut p = Producer::new(raw(&s2)).unwrap();
                assert!(p.try_write(FIRST | LAST, &[&[1; 8]]).unwrap());
                p.commit();
                assert!(p.try_write(FIRST | LAST, &[&[2; 24]]).unwrap());
                p.commit();
            });
            let mut c = Consumer::new(raw(&s)).unwrap();
            let mut got = Vec::new();
            while got.len() < 2 {
                match pop(&mut c) {
                    Some(v) => got.push(v),
                    None => thread::yield_now(),
                }
            }
            prod.join().unwrap();
            assert_eq!(got, [vec![1u8; 8], vec![2u8; 24]]);
            assert_eq!(pop(&mut c), None);
        });
    }

    /// The want-space handshake never loses a request: if the producer stopped because the
    /// ring was full, its re-check saw the freed space, or the consumer's release returned
    /// true, or the fenced check that release left owed returned true when the consumer paid
    /// it. `pay` is the consumer's fence: its arm before sleeping ([`crate::notify::arm`]),
    /// or the periodic [`settle_fence`].
    fn want_space_model(pay: fn(&crate::sync::AtomicU32)) {
        loom::model(move || {
            let s = shared(64);
            let mut p = Producer::new(raw(&s)).unwrap();
            assert!(p.try_write(FIRST | LAST, &[&[7u8; 8]]).unwrap());
            p.commit();
            let s2 = s.clone();
            let cons = thread::spawn(move || {
                let mut c = Consumer::new(raw(&s2)).unwrap();
                let info = c.peek().unwrap().unwrap();
                // SAFETY: discard the record from peek.
                unsafe { c.consume(info, None) };
                let woken = c.release();
                // Nothing more to read: the consumer arms (or a later pass pays), then
                // settles what the release left owed.
                let parked = crate::sync::AtomicU32::new(0);
                pay(&parked);
                let settled = c.settle();
                assert!(!(woken && settled), "one request, two wake-ups");
                woken || settled
            });
            let room = p.request_space(8).unwrap();
            let woken = cons.join().unwrap();
            assert!(room >= 8 || woken, "producer waits for space and nobody will wake it");
        });
    }

    #[test]
    fn want_space_no_lost_request_paid_at_arm() {
        want_space_model(|parked| crate::notify::arm(parked));
    }

    #[test]
    fn want_space_no_lost_request_paid_by_periodic_settle() {
        want_space_model(|_| settle_fence());
    }

    /// The whole full-ring path between two processes: the producer asks for room, and if
    /// its re-check finds none it arms its own wake-up and re-checks once more (as
    /// `ShmPort::arm` retries the backlog); the consumer releases, pays the owed check at its
    /// arm, and wakes a producer that asked (fence, then the `parked` claim). A producer
    /// that decides to sleep always gets its eventfd written.
    #[test]
    fn full_ring_producer_is_woken() {
        use crate::notify;
        use crate::sync::AtomicU32;
        loom::model(|| {
            let s = shared(64);
            let pparked = Arc::new(AtomicU32::new(0));
            let efd = Arc::new(AtomicU64::new(0));
            let mut p = Producer::new(raw(&s)).unwrap();
            assert!(p.try_write(FIRST | LAST, &[&[7u8; 8]]).unwrap());
            p.commit();
            let (s2, pp, e) = (s.clone(), pparked.clone(), efd.clone());
            let cons = thread::spawn(move || {
                let mut c = Consumer::new(raw(&s2)).unwrap();
                let info = c.peek().unwrap().unwrap();
                // SAFETY: discard the record from peek.
                unsafe { c.consume(info, None) };
                // As `ShmPort::drain`, then `ShmPort::arm`: wake at once when the release's
                // pre-check sees the request, else when the arm pays the owed check.
                let wake = || {
                    notify::after_commit();
                    if notify::should_wake(&pp) {
                        e.fetch_add(1, Ordering::Relaxed);
                    }
                };
                if c.release() {
                    wake();
                }
                let cparked = AtomicU32::new(0);
                notify::arm(&cparked);
                if c.settle() {
                    wake();
                }
            });
            let mut sleeps = p.request_space(8).unwrap() < 8;
            if sleeps {
                notify::arm(&pparked);
                sleeps = p.body_room(8).unwrap() < 8;
                if !sleeps {
                    notify::disarm(&pparked);
                }
            }
            cons.join().unwrap();
            if sleeps {
                assert_eq!(efd.load(Ordering::Relaxed), 1, "lost wake-up of a producer waiting for room");
            }
        });
    }
}
