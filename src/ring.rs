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
//! Protocol: the producer writes body and header words, the header's line last (the body
//! past it first, then the body head that shares it, then `len`): a consumer that waits for
//! the record polls that line, and each of its reads while the line is being written sends
//! the line back and forth once more. The stamp of every record but the
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

/// Ask the cache for the line at `p`: a hint that reads nothing and never faults, whatever
/// the address (both rings' readers, for the record they read next). A no-op off x86-64
/// and under loom.
#[inline(always)]
pub(crate) fn prefetch_line<T>(p: *const T) {
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    // SAFETY: a prefetch has no architectural effect and never faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p.cast::<i8>(), std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(all(target_arch = "x86_64", not(loom))))]
    let _ = p;
}

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
// (header words and body copies alike); moving the view between threads is fine.
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
        // bit validity of u64. Both sides access the data area only through these atomics
        // (header words, and the body copies in `copy_in`/`copy_out`), so whatever the other
        // process does concurrently is never a data race.
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
    ///
    /// Resynchronization: when the hint is impossible, or the walk from it meets an impossible
    /// record, the producer adopts the **consumer's** position instead: it walks from
    /// `read_pos` (every record it passes is a valid, unconsumed one that stays), stops at
    /// the first slot that does not hold one and, when that slot is corrupt, clears its
    /// stamp word before anything else, so the consumer (quarantined there, or arriving
    /// there) finds an empty slot and then this producer's records. `Err` only when the
    /// consumer's position itself is unusable (not a multiple of [`REC_ALIGN`], or within
    /// two rings of `u64::MAX`): the consumer repairs it at its next attach
    /// ([`Consumer::new`]) and the caller retries.
    pub(crate) fn new(ring: RawRing) -> Result<Self, Corrupt> {
        let h = ring.hdr();
        // A predecessor's request for room is not ours: our backlog starts empty, and a
        // flag left set with nothing to consume would never be answered
        // ([`Producer::space_requested`] would hold our retries back for good).
        h.producer.want_space.store(0, Ordering::Relaxed);
        let hint = h.producer.write_pos.load(Ordering::Acquire);
        let read = h.consumer.read_pos.load(Ordering::Acquire);
        let cap = ring.cap as u64;
        if !usable_pos(read, cap) {
            return Err(Corrupt);
        }
        // The hint never passes the committed end (<= read + cap) and lags it by less than
        // a quarter ring plus one batch (< 2 cap).
        let hint_ok = usable_pos(hint, cap) && hint <= read + cap && read <= hint.saturating_add(2 * cap);
        if hint_ok {
            let published = h.producer.published.load(Ordering::Relaxed);
            if let (end, n, false) = walk(&ring, hint.max(read), read) {
                return Ok(Producer::at(ring, end, read, published.wrapping_add(n), hint));
            }
        }
        // Adopt the consumer's position: what it has not consumed yet is walked and kept.
        let consumed = h.consumer.consumed.load(Ordering::Relaxed);
        let (end, n, corrupt) = walk(&ring, read, read);
        if corrupt {
            // Clear the impossible stamp first (see above); the records written from here
            // replace whatever was there.
            ring.word(ring.off(end)).store(0, Ordering::Release);
            fence(Ordering::SeqCst);
        }
        let mut p = Producer::at(ring, end, read, consumed.wrapping_add(n), hint);
        // The hint is rewritten now: a successor or the consumer never meets the bad one.
        p.store_hint();
        Ok(p)
    }

    fn at(ring: RawRing, pos: u64, read: u64, published: u64, hinted: u64) -> Self {
        Producer { ring, write: pos, committed: pos, cached_read: read, published, hinted }
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
    #[inline(always)]
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
        let off = self.ring.off(self.write);
        // SAFETY: need <= free space, so [write, write + need) is owned by the producer; each
        // part is copied at increasing positions inside that range. `store_words` writes the
        // body bytes of the header's line: from `off + REC_HDR` (8-aligned, as records start
        // at multiples of 64) to the line's end, inside the record (the body reaches past it).
        unsafe {
            if let [p] = parts {
                // The body past the header's line first, the header's line last: a consumer
                // that waits for this record polls that line, so its words (body head, then
                // length, then at commit the stamp) are stored in one burst instead of
                // around the rest of the body. A header line never wraps (module docs).
                if let Some((head, rest)) = p.split_first_chunk::<{ REC_ALIGN - REC_HDR }>() {
                    self.ring.copy_in(pos + head.len() as u64, rest);
                    self.clear_next_stamp(end);
                    self.ring.store_words(off + REC_HDR, head);
                } else {
                    self.clear_next_stamp(end);
                    self.ring.copy_in(pos, p);
                }
            } else {
                for p in parts {
                    self.ring.copy_in(pos, p);
                    pos += p.len() as u64;
                }
                self.clear_next_stamp(end);
            }
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
        Ok(true)
    }

    /// Before a record ending at `end` is stamped: when the next record slot is free space,
    /// clear its stamp word, so the consumer never finds old bytes there (module docs).
    #[inline(always)]
    fn clear_next_stamp(&self, end: u64) {
        if end - self.cached_read < self.ring.cap as u64 {
            self.ring.word(self.ring.off(end)).store(0, Ordering::Relaxed);
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

    /// Our last [`Producer::request_space`] is still unanswered: the consumer has not yet
    /// cleared the flag, which it does (and wakes us) once it frees space after seeing it.
    /// Until then a retry would find no room it has not reported, so a backlog retry may
    /// skip this ring: one load of our own line instead of a load of the consumer's
    /// position (a line the running consumer keeps writing) and a fenced request, per ring
    /// and per publish. A retry skipped after [`crate::notify::arm`] is safe: if this load
    /// misses the consumer's clearing swap, the consumer's fenced load of our `parked`
    /// flag sees the arm and writes our eventfd (loom model
    /// `full_ring_producer_skipping_while_asked_is_woken`). Any value other than 1 (the
    /// consumer's memory is untrusted) reads as answered, so the retry goes ahead.
    pub(crate) fn space_requested(&self) -> bool {
        self.ring.hdr().producer.want_space.load(Ordering::Relaxed) == 1
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
    /// The ring is quarantined (an impossible record at `read`): treated as empty until
    /// what this snapshot recorded changes.
    quarantined: Option<Snapshot>,
    /// A corruption was reported and no record was consumed since: a new corruption is
    /// part of the same episode and is not reported again.
    episode: bool,
    /// Messages skipped by a resynchronization, reported by the next [`Consumer::take_lost`].
    gap: u64,
    /// [`Consumer::new`] resynchronized and nobody asked yet ([`Consumer::take_resynced`]).
    resynced: bool,
}

impl Consumer {
    /// Resume consuming from the stored `read_pos`.
    ///
    /// Resynchronization: when `read_pos` is unusable (not a multiple of [`REC_ALIGN`], or
    /// within two rings of `u64::MAX`), the consumer adopts the **producer's** position: the
    /// end of the records stamped from the `write_pos` hint (0 when the hint is unusable
    /// too). Records before it are skipped, never delivered twice; the messages skipped
    /// (estimated from the producer's `published` and our `consumed` counters, at most what
    /// fits in the gap) are reported by the next [`Consumer::take_lost`]. The adopted
    /// position is stored at once, so a restarted producer adopts it in turn
    /// ([`Producer::new`]); [`Consumer::take_resynced`] tells the caller, which counts and
    /// logs it. The producer's hint is not needed otherwise: stamps decide. Never `Err`
    /// (the `Result` keeps the ends' constructors alike).
    pub(crate) fn new(ring: RawRing) -> Result<Self, Corrupt> {
        let h = ring.hdr();
        let read = h.consumer.read_pos.load(Ordering::Acquire);
        let consumed = h.consumer.consumed.load(Ordering::Relaxed);
        let cap = ring.cap as u64;
        let mut c = Consumer {
            ring,
            read,
            released: read,
            consumed,
            unchecked: false,
            owed: false,
            quarantined: None,
            episode: false,
            gap: 0,
            resynced: false,
        };
        if usable_pos(read, cap) {
            return Ok(c);
        }
        let hint = h.producer.write_pos.load(Ordering::Acquire);
        let published = h.producer.published.load(Ordering::Relaxed);
        let (start, published) = if usable_pos(hint, cap) { (hint, published) } else { (0, consumed) };
        let (end, n, _) = walk(&ring, start, start);
        let gap = published.wrapping_add(n).saturating_sub(consumed).min((end - start) / REC_ALIGN as u64);
        c.read = end;
        c.released = end;
        c.consumed = consumed.wrapping_add(gap);
        c.gap = gap;
        c.resynced = true;
        h.consumer.consumed.store(c.consumed, Ordering::Relaxed);
        h.consumer.read_pos.store(end, Ordering::Release);
        Ok(c)
    }

    /// Whether [`Consumer::new`] resynchronized (once: the flag is cleared).
    pub(crate) fn take_resynced(&mut self) -> bool {
        std::mem::take(&mut self.resynced)
    }

    /// Is a committed record waiting at the read position? One Acquire load of its stamp.
    pub(crate) fn has_data(&mut self) -> bool {
        if self.quarantined.is_some() {
            return self.leave_quarantine();
        }
        self.ring.word(self.ring.off(self.read)).load(Ordering::Acquire) == stamp(self.read)
    }

    /// The data area's size in bytes.
    pub(crate) fn capacity(&self) -> usize {
        self.ring.cap
    }

    /// Look at the next record without consuming it.
    pub(crate) fn peek(&mut self) -> Result<Option<RecordInfo>, Corrupt> {
        if self.quarantined.is_some() && !self.leave_quarantine() {
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
    #[inline(always)]
    pub(crate) unsafe fn consume(&mut self, info: RecordInfo, dst: Option<*mut u8>) {
        if let Some(dst) = dst {
            // SAFETY: peek checked that the record is stamped (committed) and lies within
            // cap of the released position, so the producer does not write it.
            unsafe { self.ring.copy_out(self.read + REC_HDR as u64, dst, info.len) };
        }
        // peek checked that this addition does not overflow (record_end).
        self.read += record_size(info.len) as u64;
        self.episode = false;
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
        let next = self.ring.off(self.read.wrapping_add(record_size(info.len) as u64));
        prefetch_line(self.ring.data.as_ptr().wrapping_add(next));
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
        let gap = std::mem::take(&mut self.gap);
        self.take_producer_lost().saturating_add(gap)
    }

    fn take_producer_lost(&mut self) -> u64 {
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

/// A ring's counters and depth as an observer that writes nothing sees them
/// ([`RawRing::observe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RingView {
    /// Messages committed and not consumed (a walk of the stamped records from `read_pos`).
    pub depth: u64,
    /// Messages the consumer has consumed.
    pub consumed: u64,
    /// Events the producer dropped for this consumer (cumulative).
    pub lost: u64,
    /// Of which already reported to the consumer's callbacks.
    pub lost_seen: u64,
    /// The producer waits for space (it has a backlog for this ring).
    pub want_space: bool,
}

impl RawRing {
    /// Read this ring's counters and depth without writing anything (the live inspector maps
    /// the region read-only). Each word is loaded once; the depth walk is bounded like the
    /// consumer's (records must end within one ring of `read_pos`), and an unusable
    /// `read_pos` (corrupt, or a consumer about to resynchronize) reads as depth 0.
    pub(crate) fn observe(&self) -> RingView {
        let h = self.hdr();
        let read = h.consumer.read_pos.load(Ordering::Acquire);
        let depth = if usable_pos(read, self.cap as u64) { walk(self, read, read).1 } else { 0 };
        RingView {
            depth,
            consumed: h.consumer.consumed.load(Ordering::Relaxed),
            lost: h.producer.lost.load(Ordering::Acquire),
            lost_seen: h.consumer.lost_seen.load(Ordering::Relaxed),
            want_space: h.producer.want_space.load(Ordering::Relaxed) != 0,
        }
    }
}

mod copy;
pub(crate) mod mcast;
mod owed;
mod resync;
use resync::{Snapshot, usable_pos, walk};

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
pub(crate) mod loom_models;
