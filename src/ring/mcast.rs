//! Single-producer, multi-consumer **broadcast ring** of variable-length records in shared
//! memory: one ring per publisher, written once, read by every receiver through its own
//! cursor (the Disruptor multicast / Agrona broadcast buffer / Aeron log buffer pattern).
//!
//! **Use.** The per-publisher topology (the default, `Options::broadcast_capacity`): one
//! ring per slot in the region, driven by `transport/shm/bcast.rs` in **diverting mode**
//! ([`Producer::set_tracking`], [`Consumer::set_stop_on_lap`]): the producer never laps a
//! reader it tracks but hands that reader's unread records to its caller first (see
//! "Diverting mode" below). `ARCHITECTURE.md`, "Per-publisher topology", has the design.
//!
//! # Memory
//!
//! One ring is `128 * (1 + readers) + capacity` bytes ([`ring_bytes`]), 128-aligned:
//!
//! | offset            | size      | what                                             | written by |
//! |-------------------|-----------|--------------------------------------------------|------------|
//! | 0                 | 128       | [`McastProducerLine`]: `floor` at +0, `floor_seq` at +8 | producer |
//! | 128 * (1 + i)     | 128       | [`CursorLine`] of reader `i`: `read_pos` +0, `next_seq` +8, `lost` +16, `laps` +24 | reader `i` |
//! | 128 * (1 + readers) | capacity | data area (a power of two >= [`MIN_CAPACITY`])  | producer   |
//!
//! A record starts on a 64-byte boundary ([`REC_ALIGN`]) and is padded to a multiple of 64; its
//! 16-byte header ([`MC_HDR`]) is two little-endian words:
//! - `+0` **commit stamp** `!pos` (the bitwise not of the record's own position), stored last
//!   with Release, as in the SPSC ring (`src/ring.rs`);
//! - `+8` the **meta word**: `len` (bits 0..24), `dest` (bits 24..32: 0 for every reader,
//!   `i + 1` for reader `i` alone, which the others skip; a value above the reader count is
//!   corrupt) and the low 32 bits of `seq` (bits 32..64), the ring's message sequence number
//!   (0 for the first record ever). Each side knows the sequence number it expects within
//!   2^31 and widens the low half around it ([`widen`]); the producer stores the whole
//!   number of the record at `floor` in `floor_seq` (for its successor's restart walk).
//!
//! So a record of a 48-byte body takes one line, and one of up to 112 bytes two (a typed
//! 64-byte event with its names and message header is about 105).
//!
//! The body follows at `+16` and may wrap around the end of the data area (the header never
//! does). Positions are byte counts that never wrap (a producer starts at most 2^62 bytes in,
//! [`usable`], which leaves centuries of writing before a `u64` could overflow). Every access
//! to the data area is a Relaxed 8-byte atomic word access (`RawMcast::word`), so a hostile
//! process writing the same bytes is never a data race, only torn contents.
//!
//! # Protocol
//!
//! **The producer never waits.** It keeps, in private memory, the start positions of the
//! records still intact in the ring (the last lap). Before it writes a record `[write, end)` it
//! clears the stamp word of the next slot (`end`), as the SPSC ring does, so a reader that has
//! caught up polls 0 there, never old body bytes; together, these destroy every record that
//! starts at or below `end - capacity`. If one of them is still listed, the producer first
//! advances **`floor`**, the position of the oldest intact record: it drops the starts up to
//! `end - capacity + capacity / 8` (the eighth amortizes the stores: `floor` moves about eight
//! times per lap, not per record), stores the new `floor` (Relaxed), and issues a **Release
//! fence**; only then does it overwrite anything. A record is at most a quarter of the ring
//! ([`max_body`]), so `floor` always names a committed record (or is 0 in a ring never lapped).
//!
//! **A reader validates seqlock-style.** At its `read` position it Acquire-loads the stamp; if
//! it is `!read` it loads `len`, `seq` and copies the body, then issues an **Acquire fence** and
//! re-loads `floor`. If `floor > read` the copy may hold overwritten bytes and is thrown away:
//! the reader is **lapped**. Otherwise every word it read is the committed record: had any load
//! seen a store the producer made after raising `floor` past `read`, the producer's Release
//! fence would synchronize with the reader's Acquire fence, and the `floor` load would see the
//! raised value. The same check decides every other case: a stamp that is 0 or an older lap's
//! is "nothing yet" unless `floor > read`; any other stamp, a `len` over the limit or non-zero
//! flags are "lapped" when `floor > read`, else [`Corrupt`].
//!
//! **A lapped reader learns exactly what it lost.** It jumps to `floor` (a record boundary the
//! producer published) and remembers the sequence number it expected next. The first record it
//! then reads intact carries `seq`; `seq - expected` messages were lost, reported by
//! [`Consumer::take_lost`]. If it is lapped again before that, it jumps again with the same
//! expectation. So delivered + lost = published, in order, never a record twice.
//!
//! **Cursors.** Reader `i` alone writes its [`CursorLine`]: `next_seq` (Relaxed) then
//! `read_pos` (Release) at [`Consumer::release`] (per batch, as the SPSC ring). The producer
//! reads cursors only to keep `min_read`, the lowest `read_pos` of the readers not yet lapped
//! (`read_pos >= floor`): it re-reads all of them only when it raises `floor` past that minimum
//! (or when it knows of no live reader), i.e. at most once per eighth of a ring, never per
//! record. A reader that is lapped (dead, stopped, or never attached: its `read_pos` stays
//! below `floor`) costs the producer nothing until it reads again. The producer does not need
//! `min_read` to write; [`Producer::would_lap`] exposes it for callers that choose to pace
//! themselves (the benches), and for statistics.
//!
//! **Restarts.** A restarted producer walks the stamped records from `floor` (at most one
//! ring), checking that their sequence numbers follow each other, and resumes after the last
//! committed one with the next sequence number; a record whose stamp was never stored (its
//! predecessor died while writing it) is overwritten. A restarted reader resumes from its
//! `read_pos`; if it was lapped meanwhile it resyncs as above (its stored `next_seq` gives the
//! loss). If its process died between its two cursor stores, the first record it reads intact
//! tells the truth: it adopts that record's `seq` (a loss computed across such a death may be
//! short by the last batch, which was delivered anyway).
//!
//! **Untrusted memory.** `floor`, cursors and every header word are checked against private
//! state before use: an unaligned or implausible position, a length over [`max_body`], a
//! sequence number out of order or a stamp that is neither expected, 0, nor an older lap's is
//! [`Corrupt`] (to the side that reads it); nothing read is used to address memory without a
//! bound check. A cursor the producer finds implausible only makes it ignore that reader.
//!
//! **Diverting mode.** With [`Producer::set_tracking`], the producer keeps, per reader,
//! whether it tracks it and a guard position (where a resume told it to continue, before its
//! cursor says so). When it raises `floor` past `min_read` it re-reads the tracked readers'
//! cursors and, for each one below the new `floor`, calls its caller's `divert` callback with
//! the reader's unread records ([`Unread`], still intact) **before** it stores `floor`, with
//! Release, and stops tracking it. A reader in stop-on-lap mode ([`Consumer::set_stop_on_lap`])
//! then reports [`Read::Lapped`] instead of resyncing, and after its Acquire fence sees
//! whatever the callback published. [`Producer::track`] tracks a reader again. Records may be
//! held uncommitted for a batch ([`Producer::set_defer`], [`Producer::commit`]).
//!
//! **Wake-ups** are not part of this module. A publisher on this ring would wake its receivers
//! as it wakes each ring's consumer today: after its commit, one fence and then one `parked`
//! check per receiver slot (`src/notify.rs`), writing the eventfd of those that sleep.

// The lapping (non-diverting) mode is used by the tests, the loom models and `fuzz_api`
// (`benches/broadcast.rs`), not by the library.
#![cfg_attr(any(not(test), loom), allow(dead_code))]

use std::collections::VecDeque;
use std::ptr::NonNull;

use super::{Corrupt, REC_ALIGN};
use crate::layout::{CursorLine, McastProducerLine};
use crate::sync::{AtomicU64, Ordering, fence};

mod consumer;
mod copy;
pub(crate) use consumer::{Consumer, Read};

/// Size of a record header: stamp, meta word (len, dest, low half of seq).
pub(crate) const MC_HDR: usize = 16;
/// Largest `len` the meta word holds (24 bits; a body is at most a quarter of a 64 MiB ring).
const LEN_MASK: u64 = (1 << 24) - 1;

/// The meta word of a record.
const fn meta(len: usize, dest: u32, seq: u64) -> u64 {
    (len as u64 & LEN_MASK) | ((dest as u64 & 0xff) << 24) | (seq << 32)
}

/// `(len, dest, low half of seq)` of a meta word.
const fn unmeta(w: u64) -> (usize, u64, u32) {
    ((w & LEN_MASK) as usize, (w >> 24) & 0xff, (w >> 32) as u32)
}

/// The sequence number whose low half is `lo`, nearest to `near` (within 2^31 either way).
pub(crate) const fn widen(near: u64, lo: u32) -> u64 {
    near.wrapping_add_signed(lo.wrapping_sub(near as u32) as i32 as i64)
}
/// Smallest data area (a record of the largest body is then 64 bytes).
pub(crate) const MIN_CAPACITY: usize = 256;
/// `floor` moves past at least this fraction of the ring at a time (an eighth).
const FLOOR_STEP_DIVISOR: u64 = 8;
/// Size of a producer or cursor line (the region's geometry uses the same figure).
pub(crate) const LINE: usize = crate::layout::MCAST_LINE;

/// Bytes of one ring with `readers` cursors and a `cap`-byte data area.
pub(crate) const fn ring_bytes(readers: usize, cap: usize) -> usize {
    LINE * (1 + readers) + cap
}

/// Largest body a ring of `cap` bytes takes: its record is a quarter of the ring.
pub(crate) const fn max_body(cap: usize) -> usize {
    cap / 4 - MC_HDR
}

/// Bytes a record with a `len`-byte body occupies.
pub(crate) const fn record_size(len: usize) -> usize {
    (MC_HDR + len + REC_ALIGN - 1) & !(REC_ALIGN - 1)
}

/// The commit stamp of a record at `pos` (never 0: positions are multiples of 64).
pub(crate) const fn stamp(pos: u64) -> u64 {
    !pos
}

/// A position either side may start from: record-aligned and at most 2^62.
pub(crate) fn usable(pos: u64) -> bool {
    pos % REC_ALIGN as u64 == 0 && pos <= 1 << 62
}

/// A buffer a record's body is copied into.
pub(crate) trait BodyBuf {
    /// The buffer resized to `len` bytes (contents unspecified), as a slice to fill.
    fn sized(&mut self, len: usize) -> &mut [u8];
}

impl BodyBuf for Vec<u8> {
    fn sized(&mut self, len: usize) -> &mut [u8] {
        self.resize(len, 0);
        self
    }
}

impl BodyBuf for rkyv::util::AlignedVec {
    fn sized(&mut self, len: usize) -> &mut [u8] {
        self.resize(len, 0);
        self
    }
}

/// A body too large for one record of this ring (the caller may split it or drop it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooLarge {
    pub len: usize,
    pub max: usize,
}

/// Raw view of one broadcast ring.
///
/// Invariants: `prod` points to a [`McastProducerLine`] and `cursors` to `readers`
/// consecutive [`CursorLine`]s; `data` to `cap / 8` consecutive [`AtomicU64`] words (the data
/// area: 64-aligned memory of `cap` bytes; under loom, an array of loom's atomics); all of it
/// outlives every producer and consumer built from this view; `cap` is a power of two
/// >= [`MIN_CAPACITY`].
#[derive(Clone, Copy)]
pub(crate) struct RawMcast {
    prod: NonNull<McastProducerLine>,
    cursors: NonNull<CursorLine>,
    readers: usize,
    data: NonNull<AtomicU64>,
    cap: usize,
}

// SAFETY: the pointers refer to memory accessed only through atomics; moving the view
// between threads is fine.
unsafe impl Send for RawMcast {}

impl RawMcast {
    /// A view over the parts of a ring.
    ///
    /// # Safety
    /// The pointers must satisfy the type invariants for as long as the view and anything
    /// built from it is used; `cap` must be a power of two >= [`MIN_CAPACITY`].
    pub(crate) unsafe fn from_parts(
        prod: NonNull<McastProducerLine>,
        cursors: NonNull<CursorLine>,
        readers: usize,
        data: NonNull<AtomicU64>,
        cap: usize,
    ) -> Self {
        assert!(cap.is_power_of_two() && cap >= MIN_CAPACITY);
        RawMcast { prod, cursors, readers, data, cap }
    }

    /// A view over [`ring_bytes`]`(readers, cap)` bytes of shared memory at `base`.
    ///
    /// # Safety
    /// `base` must be 128-aligned, valid for [`ring_bytes`] bytes for as long as the view is
    /// used, and accessed by every process only through this module; `cap` a power of two
    /// >= [`MIN_CAPACITY`].
    #[cfg(not(loom))]
    pub(crate) unsafe fn from_base(base: NonNull<u8>, readers: usize, cap: usize) -> Self {
        assert!(base.as_ptr() as usize % LINE == 0);
        // SAFETY: the offsets stay within the ring_bytes(readers, cap) bytes at base
        // (caller); the lines are 128-aligned and the data area is 128-aligned.
        unsafe {
            Self::from_parts(base.cast(), base.add(LINE).cast(), readers, base.add(LINE * (1 + readers)).cast(), cap)
        }
    }

    fn prod(&self) -> &McastProducerLine {
        // SAFETY: valid for the view's lifetime (type invariant); atomics only.
        unsafe { self.prod.as_ref() }
    }

    /// The number of cursors.
    pub(crate) fn readers(&self) -> usize {
        self.readers
    }

    fn cursor(&self, i: usize) -> &CursorLine {
        assert!(i < self.readers);
        // SAFETY: i < readers, so the line is inside the cursor array (type invariant).
        unsafe { self.cursors.add(i).as_ref() }
    }

    /// The `next_seq` reader `i` stored with its last `read_pos` (observers, benches).
    pub(crate) fn released_seq(&self, i: usize) -> u64 {
        let c = self.cursor(i);
        c.read_pos.load(Ordering::Acquire);
        c.next_seq.load(Ordering::Relaxed)
    }

    /// Records for reader `i` committed past its stored cursor (or past `floor`, if that is
    /// higher): a bounded walk of loads only (at most one ring), for statistics and the
    /// read-only inspector. Stops at the first slot that holds no committed record.
    pub(crate) fn unread_for(&self, i: usize) -> u64 {
        let floor = self.prod().floor.load(Ordering::Acquire);
        let mut pos = self.cursor(i).read_pos.load(Ordering::Acquire).max(floor);
        if !usable(pos) {
            return 0;
        }
        let mut n = 0;
        for _ in 0..self.cap / REC_ALIGN {
            let off = self.off(pos);
            if self.word(off).load(Ordering::Acquire) != stamp(pos) {
                break;
            }
            let (len, dest, _) = unmeta(self.word(off + 8).load(Ordering::Relaxed));
            if len > max_body(self.cap) {
                break;
            }
            n += u64::from(len > 0 && (dest == 0 || dest == i as u64 + 1));
            pos += record_size(len) as u64;
        }
        n
    }

    /// Data offset of position `pos`.
    fn off(&self, pos: u64) -> usize {
        (pos as usize) & (self.cap - 1)
    }

    /// Ask the cache for the line at position `pos`: the next record's stamp, whose transfer
    /// from the producer's core then overlaps with the copy of this one (as the SPSC ring's
    /// `Consumer::prefetch_next`). A hint only: it reads nothing.
    #[inline]
    fn prefetch(&self, pos: u64) {
        super::prefetch_line(self.data.as_ptr().wrapping_add(self.off(pos) / 8));
    }

    /// The 8-byte word at data offset `off` (a multiple of 8, below `cap`).
    fn word(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off % 8 == 0 && off < self.cap);
        // SAFETY: off / 8 < cap / 8, the number of words at `data` (type invariant); every
        // process accesses them only atomically.
        unsafe { self.data.add(off / 8).as_ref() }
    }

    /// Whether a stamp word `s` found at `pos` means "not written yet": 0 (cleared by the
    /// producer), or the stamp of an older record at the same offset.
    fn empty_stamp(&self, s: u64, pos: u64) -> bool {
        let old = !s;
        s == 0 || (old < pos && self.off(old) == self.off(pos))
    }

    /// The header at `pos` if its stamp says a record was committed there: `(len, low half
    /// of seq)`,
    /// `Ok(None)` when empty, `Err` for any other stamp or an impossible length or flags.
    /// For the producer's restart walk (no concurrent writer).
    fn read_committed(&self, pos: u64) -> Result<Option<(usize, u32)>, Corrupt> {
        let off = self.off(pos);
        let s = self.word(off).load(Ordering::Acquire);
        if s != stamp(pos) {
            return if self.empty_stamp(s, pos) { Ok(None) } else { Err(Corrupt) };
        }
        let (len, dest, seq_lo) = unmeta(self.word(off + 8).load(Ordering::Relaxed));
        if len > max_body(self.cap) || dest > self.readers as u64 {
            return Err(Corrupt);
        }
        Ok(Some((len, seq_lo)))
    }

    /// The record the producer wrote at `pos` (committed, or held by [`Producer::set_defer`];
    /// no concurrent writer): `(seq, dest)` with its body copied into `buf`.
    fn own_record(&self, pos: u64, near: u64, buf: &mut Vec<u8>) -> Option<(u64, u32)> {
        let off = self.off(pos);
        let (len, dest, seq_lo) = unmeta(self.word(off + 8).load(Ordering::Relaxed));
        buf.resize(len.min(max_body(self.cap)), 0);
        self.copy_out(pos + MC_HDR as u64, buf);
        Some((widen(near, seq_lo), dest as u32))
    }
}

/// The records a diverted reader has not read, handed to [`Producer::publish_to`]'s `divert`
/// callback before `floor` passes them: the intact records from a position on.
pub(crate) struct Unread<'a> {
    ring: RawMcast,
    starts: &'a VecDeque<u64>,
    from: u64,
    /// The producer's next sequence number (every intact record is within a ring of it).
    near: u64,
}

impl Unread<'_> {
    /// Visit each record `(seq, dest, body)` at or past the reader's position, oldest first.
    pub(crate) fn for_each(&self, mut f: impl FnMut(u64, u32, &[u8])) {
        let mut buf = Vec::new();
        let first = self.starts.partition_point(|&s| s < self.from);
        for &pos in self.starts.range(first..) {
            if let Some((seq, dest)) = self.ring.own_record(pos, self.near, &mut buf) {
                f(seq, dest, &buf);
            }
        }
    }
}

/// The writing end. One per ring in the whole system (the publisher slot's lock).
pub(crate) struct Producer {
    ring: RawMcast,
    /// Next position to write (the committed end: every record is committed as written).
    write: u64,
    /// Sequence number of the next record.
    seq: u64,
    /// Starts of the intact records, oldest first (its front is `floor` once it was stored).
    starts: VecDeque<u64>,
    /// Lowest `read_pos` of the readers not lapped at the last cursor scan; `u64::MAX`: none.
    min_read: u64,
    /// Cursor scans made by [`Producer::publish`] (statistics; tests check the amortization).
    scans: u64,
    /// Diverting mode ([`Producer::set_tracking`]): per reader, whether it reads this ring
    /// (tracked) and the position it is known to resume from at least (its guard: the
    /// position a resume marker gave it, before its cursor says so).
    tracking: Option<Vec<(bool, u64)>>,
    /// Leave records uncommitted (stamps not stored) until [`Producer::commit`].
    defer: bool,
    /// Positions of the records written and not committed yet, oldest first.
    uncommitted: Vec<u64>,
}

impl Producer {
    /// Resume producing on `ring`: walk the committed records from `floor` (at most one ring,
    /// sequence numbers consecutive) and continue after the last one. `Err` when `floor` is
    /// unusable or the walk meets an impossible record; a fresh (zeroed) ring starts at 0
    /// with sequence number 0.
    pub(crate) fn new(ring: RawMcast) -> Result<Self, Corrupt> {
        let floor = ring.prod().floor.load(Ordering::Acquire);
        if !usable(floor) {
            return Err(Corrupt);
        }
        let cap = ring.cap as u64;
        let mut starts = VecDeque::with_capacity(ring.cap / REC_ALIGN);
        let (mut pos, mut next) = (floor, None::<u64>);
        // The whole sequence number of the record at `floor` (stored with it; a predecessor
        // that died between the two stores left one within a ring of it).
        let hint = ring.prod().floor_seq.load(Ordering::Relaxed);
        while let Some((len, seq_lo)) = ring.read_committed(pos)? {
            let seq = widen(next.unwrap_or(hint), seq_lo);
            if next.is_some_and(|n| n != seq) || seq == u64::MAX {
                return Err(Corrupt);
            }
            let end = pos + record_size(len) as u64;
            if end - floor > cap {
                return Err(Corrupt);
            }
            starts.push_back(pos);
            next = Some(seq + 1);
            pos = end;
        }
        // `floor` names a committed record once the ring was lapped (module docs).
        let seq = match next {
            Some(s) => s,
            None if floor == 0 => 0,
            None => return Err(Corrupt),
        };
        let mut p = Producer {
            ring,
            write: pos,
            seq,
            starts,
            min_read: u64::MAX,
            scans: 0,
            tracking: None,
            defer: false,
            uncommitted: Vec::new(),
        };
        p.scan(floor);
        Ok(p)
    }

    /// Largest body one record can carry.
    pub(crate) fn max_body(&self) -> usize {
        max_body(self.ring.cap)
    }

    /// Messages published so far (the sequence number of the next one).
    pub(crate) fn published(&self) -> u64 {
        self.seq
    }

    /// Cursor scans made so far (statistics).
    pub(crate) fn scans(&self) -> u64 {
        self.scans
    }

    /// Position of the next record (the end of what was written).
    pub(crate) fn write_pos(&self) -> u64 {
        self.write
    }

    /// Hold the records published from now on uncommitted (a batch), or stop holding them.
    /// Held records are committed by [`Producer::commit`], or before anything would lap
    /// them (a batch larger than the ring is committed in parts, so `floor` always names a
    /// committed record).
    pub(crate) fn set_defer(&mut self, on: bool) {
        self.defer = on;
    }

    /// Commit the held records: their stamps, newest first (Release), so a reader polling the
    /// oldest sees them all at once. Returns whether there were any.
    pub(crate) fn commit(&mut self) -> bool {
        if self.uncommitted.is_empty() {
            return false;
        }
        for &pos in self.uncommitted.iter().rev() {
            self.ring.word(self.ring.off(pos)).store(stamp(pos), Ordering::Release);
        }
        self.uncommitted.clear();
        true
    }

    /// Switch to diverting mode: `tracked[i]` says whether reader `i` reads this ring. A
    /// tracked reader is never lapped: before `floor` passes its position, the producer hands
    /// its unread records to the `divert` callback of [`Producer::publish_to`] and stops
    /// tracking it (the caller then carries its events another way, and tracks it again with
    /// [`Producer::track`] once it has caught up).
    pub(crate) fn set_tracking(&mut self, tracked: &[bool]) {
        assert_eq!(tracked.len(), self.ring.readers);
        // A reader's guard starts at `floor`: one that was told to resume at a position its
        // cursor has not reached yet (its marker unread when this producer's predecessor
        // died) is there or above, never below.
        let floor = self.starts.front().copied().unwrap_or(self.write);
        self.tracking = Some(tracked.iter().map(|&t| (t, floor)).collect());
        self.min_read = u64::MAX;
        self.scan_tracked(floor, &mut |_, _| {});
    }

    /// Track reader `i` again from position `guard` on (a record boundary at or below the
    /// write position: where a resume marker told it to continue).
    pub(crate) fn track(&mut self, i: usize, guard: u64) {
        let t = self.tracking.as_mut().expect("diverting mode");
        t[i] = (true, guard);
        self.min_read = self.min_read.min(guard);
    }

    /// The readers tracked (diverting mode), in index order.
    pub(crate) fn tracked(&self) -> impl Iterator<Item = usize> + '_ {
        self.tracking.iter().flat_map(|t| t.iter().enumerate().filter(|(_, t)| t.0).map(|(i, _)| i))
    }

    /// Whether reader `i` is tracked (diverting mode).
    pub(crate) fn is_tracked(&self, i: usize) -> bool {
        self.tracking.as_ref().is_some_and(|t| t[i].0)
    }

    /// Stop tracking every tracked reader, handing each its unread records first (a message
    /// too large for this ring goes another way to everyone): the scan that precedes a floor
    /// raise, with every position below the new floor.
    pub(crate) fn divert_all(&mut self, mut divert: impl FnMut(usize, &Unread<'_>)) {
        self.scan_tracked(u64::MAX, &mut divert);
    }

    /// Where tracked reader `i` is: its stored cursor if plausible (aligned, not past the
    /// write position), never below its guard.
    fn position_of(ring: RawMcast, i: usize, guard: u64, write: u64) -> u64 {
        let r = ring.cursor(i).read_pos.load(Ordering::Acquire);
        if r % REC_ALIGN as u64 == 0 && r <= write { r.max(guard) } else { guard }
    }

    /// Diverting mode's scan before `floor` is raised to `floor`: every tracked reader below
    /// it is handed its unread records and untracked; `min_read` is the lowest of the rest.
    fn scan_tracked(&mut self, floor: u64, divert: &mut dyn FnMut(usize, &Unread<'_>)) {
        self.scans += 1;
        let ring = self.ring;
        let old_floor = self.starts.front().copied().unwrap_or(self.write);
        let Some(t) = self.tracking.as_mut() else { return };
        let mut min = u64::MAX;
        for (i, slot) in t.iter_mut().enumerate() {
            if !slot.0 {
                continue;
            }
            let pos = Self::position_of(ring, i, slot.1, self.write);
            if pos < floor {
                divert(i, &Unread { ring, starts: &self.starts, from: pos.max(old_floor), near: self.seq });
                slot.0 = false;
            } else {
                min = min.min(pos);
            }
        }
        self.min_read = min;
    }

    /// Re-read every cursor: `min_read` = the lowest plausible `read_pos` at or above
    /// `floor` (a reader below it is lapped and ignored; one that is unaligned or past the
    /// write position is ignored too: it will find its own cursor corrupt).
    fn scan(&mut self, floor: u64) {
        self.scans += 1;
        self.min_read = (0..self.ring.readers)
            .map(|i| self.ring.cursor(i).read_pos.load(Ordering::Acquire))
            .filter(|&r| r % REC_ALIGN as u64 == 0 && r >= floor && r <= self.write)
            .min()
            .unwrap_or(u64::MAX);
    }

    /// The `floor` that writing a record of `size` bytes requires, if it must move: the first
    /// intact start above `end - cap + cap / 8` (module docs), or the write position.
    fn floor_for(&self, size: u64) -> Option<u64> {
        let dead = (self.write + size).checked_sub(self.ring.cap as u64)?;
        if self.starts.front().is_none_or(|&f| f > dead) {
            return None;
        }
        let keep_above = dead + self.ring.cap as u64 / FLOOR_STEP_DIVISOR;
        Some(self.starts.iter().copied().find(|&s| s > keep_above).unwrap_or(self.write))
    }

    /// Would publishing a `len`-byte body lap a reader that is not lapped yet? Re-reads the
    /// cursors only when the cached minimum says so. For callers that pace themselves; the
    /// producer itself never waits.
    pub(crate) fn would_lap(&mut self, len: usize) -> bool {
        let Some(floor) = self.floor_for(record_size(len) as u64) else { return false };
        if floor <= self.min_read {
            return false;
        }
        self.scan(self.starts.front().copied().unwrap_or(self.write));
        self.scans -= 1; // a pacing caller's re-check, not the publishing path's
        floor > self.min_read
    }

    /// Publish one record with body `body`; returns its sequence number. Never waits: a reader
    /// still reading what this overwrites is lapped (and told by its own checks).
    pub(crate) fn publish(&mut self, body: &[u8]) -> Result<u64, TooLarge> {
        self.publish_to(body, 0, |_, _| {})
    }

    /// [`Producer::publish`] for readers `dest` (0: every reader; `i + 1`: reader `i` alone).
    /// In diverting mode ([`Producer::set_tracking`]), before `floor` passes a tracked
    /// reader's position, `divert(i, unread)` is called with the records it has not read
    /// (they are still intact) and the reader is untracked; the caller must make that
    /// visible to the reader before returning (its `floor` check then tells it where to go).
    #[inline]
    pub(crate) fn publish_to(
        &mut self,
        body: &[u8],
        dest: u32,
        mut divert: impl FnMut(usize, &Unread<'_>),
    ) -> Result<u64, TooLarge> {
        let len = body.len();
        if len > self.max_body() {
            return Err(TooLarge { len, max: self.max_body() });
        }
        debug_assert!(dest as usize <= self.ring.readers);
        let size = record_size(len) as u64;
        if let Some(floor) = self.floor_for(size) {
            // Held records below the new floor: commit them first (see `set_defer`).
            if self.uncommitted.first().is_some_and(|&u| u < floor) {
                self.commit();
            }
            if self.tracking.is_some() && (floor > self.min_read || self.min_read == u64::MAX) {
                // Before anything below `floor` is destroyed: tracked readers there are
                // handed what they have not read.
                self.scan_tracked(floor, &mut divert);
            }
            while self.starts.front().is_some_and(|&s| s < floor) {
                self.starts.pop_front();
            }
            // The record at `floor` is the oldest of `starts` (or the next one, if none).
            self.ring.prod().floor_seq.store(self.seq - self.starts.len() as u64, Ordering::Relaxed);
            // Release: a reader that sees this floor also sees what `divert` published.
            self.ring.prod().floor.store(floor, Ordering::Release);
            // Orders the floor store before every overwriting store below (module docs).
            fence(Ordering::Release);
            if self.tracking.is_none() && (floor > self.min_read || self.min_read == u64::MAX) {
                self.scan(floor);
            }
        }
        let (pos, end) = (self.write, self.write + size);
        let off = self.ring.off(pos);
        // The record's first line last (as the SPSC ring does): a reader that has caught up
        // polls the stamp in it, and would pull the line back between our stores to it. So
        // first the body past that line, then the next slot's stamp word (readers that catch
        // up find 0 there, module docs), then the meta word and the body's head, then the
        // stamp: the first line's stores come back to back.
        let head = body.len().min(REC_ALIGN - MC_HDR);
        if head < body.len() {
            self.ring.copy_in(pos + REC_ALIGN as u64, &body[head..]);
        }
        self.ring.word(self.ring.off(end)).store(0, Ordering::Relaxed);
        self.ring.word(off + 8).store(meta(len, dest, self.seq), Ordering::Relaxed);
        self.ring.copy_in(pos + MC_HDR as u64, &body[..head]);
        if self.defer {
            self.uncommitted.push(pos);
        } else {
            self.ring.word(off).store(stamp(pos), Ordering::Release);
        }
        self.starts.push_back(pos);
        self.write = end;
        self.seq += 1;
        Ok(self.seq - 1)
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_models;
