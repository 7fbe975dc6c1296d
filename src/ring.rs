//! Single-producer single-consumer ring of variable-length records over a [`RingHeader`]
//! and a power-of-two data area, both in shared memory. No syscalls here.
//!
//! A record is an 8-byte header (`len: u32`, `flags: u32`) followed by `len` body bytes,
//! padded to a multiple of 8. Positions are byte counts since the ring was created (`u64`,
//! never wrap); the offset in the data area is `pos & (capacity - 1)`. A body may wrap
//! around the end of the data area: it is copied in two pieces, so no space is wasted.
//! The header never wraps: records start at multiples of 8 and the capacity is one.
//!
//! Protocol: the producer writes records past `write_pos`, then publishes them all with one
//! Release store of `write_pos` (a producer killed before that store leaves nothing visible).
//! The consumer Acquire-loads `write_pos`, copies records out, and Release-stores
//! `read_pos`. Each side caches the other's position and re-reads it only when the ring
//! looks full (producer) or empty (consumer).
//!
//! Both positions are untrusted: the other side may be buggy or hostile. Every value read
//! is checked against the side's own private state; a violation is reported as
//! [`Corrupt`], never trusted for addressing.

use std::ptr::NonNull;

use crate::layout::RingHeader;
use crate::sync::{Ordering, fence};

/// Size of a record header.
pub(crate) const REC_HDR: usize = 8;
/// First record of a message.
pub(crate) const FIRST: u32 = 1;
/// Last record of a message (a whole message in one record is `FIRST | LAST`).
pub(crate) const LAST: u32 = 2;

/// Bytes a record with a `len`-byte body occupies.
pub(crate) const fn record_size(len: usize) -> usize {
    REC_HDR + ((len + 7) & !7)
}

/// The other side broke the ring protocol (or shared memory was overwritten).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Corrupt;

/// Raw view of one ring: header and data area.
///
/// Invariants: `hdr` points to a `RingHeader` and `data` to `cap` bytes, both inside a
/// mapping that outlives every `Producer`/`Consumer` built from this view; `cap` is a power
/// of two >= 8.
#[derive(Clone, Copy)]
pub(crate) struct RawRing {
    pub hdr: NonNull<RingHeader>,
    pub data: NonNull<u8>,
    pub cap: usize,
}

// SAFETY: the pointers refer to shared memory that is only accessed through atomics
// (header) or through the SPSC protocol (data); moving the view between threads is fine.
unsafe impl Send for RawRing {}

impl RawRing {
    fn hdr(&self) -> &RingHeader {
        // SAFETY: per the type invariant the header is valid for the mapping's lifetime and
        // consists only of atomics, so a shared reference never aliases plain mutable memory.
        unsafe { self.hdr.as_ref() }
    }

    /// Copy `src` into the data area at position `pos`, wrapping around the end.
    ///
    /// # Safety
    /// `[pos, pos + src.len())` must be free space owned by the producer, `src.len() <= cap`.
    unsafe fn copy_in(&self, pos: u64, src: &[u8]) {
        let off = (pos as usize) & (self.cap - 1);
        let first = src.len().min(self.cap - off);
        // SAFETY: off + first <= cap and src.len() - first <= cap - first, both ranges lie in
        // the data area; the caller owns them. Source is private memory, so no overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.data.as_ptr().add(off), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), self.data.as_ptr(), src.len() - first);
        }
    }

    /// Copy `len` bytes at position `pos` out of the data area to `dst`.
    ///
    /// # Safety
    /// `[pos, pos + len)` must be committed, unconsumed bytes; `dst` valid for `len` writes.
    unsafe fn copy_out(&self, pos: u64, dst: *mut u8, len: usize) {
        let off = (pos as usize) & (self.cap - 1);
        let first = len.min(self.cap - off);
        // SAFETY: as in copy_in, both ranges are inside the data area; dst is private memory.
        unsafe {
            std::ptr::copy_nonoverlapping(self.data.as_ptr().add(off), dst, first);
            std::ptr::copy_nonoverlapping(self.data.as_ptr(), dst.add(first), len - first);
        }
    }
}

/// The writing end. At most one `Producer` per ring exists in the whole system: the slot
/// lock of the producing slot guarantees it across processes.
pub(crate) struct Producer {
    ring: RawRing,
    /// Next byte to write (ahead of `committed` while a batch is open).
    write: u64,
    /// Last value stored to `write_pos`.
    committed: u64,
    /// Last `read_pos` seen; `write - cached_read <= cap` always.
    cached_read: u64,
    /// Messages written (committed or not).
    published: u64,
}

impl Producer {
    /// Resume producing on `ring` from the positions stored in it (a restarted producer
    /// continues where its predecessor committed; anything it wrote but had not committed is
    /// overwritten).
    pub(crate) fn new(ring: RawRing) -> Result<Self, Corrupt> {
        let h = ring.hdr();
        let write = h.producer.write_pos.load(Ordering::Acquire);
        let read = h.consumer.read_pos.load(Ordering::Acquire);
        if read > write || write - read > ring.cap as u64 || write % 8 != 0 {
            return Err(Corrupt);
        }
        let published = h.producer.published.load(Ordering::Relaxed);
        Ok(Producer { ring, write, committed: write, cached_read: read, published })
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
        Ok(free.saturating_sub(REC_HDR) & !7)
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
        let mut hdr = [0u8; REC_HDR];
        hdr[..4].copy_from_slice(&(len as u32).to_le_bytes());
        hdr[4..].copy_from_slice(&flags.to_le_bytes());
        let mut pos = self.write;
        // SAFETY: need <= free space, so [write, write + need) is owned by the producer; each
        // part is copied at increasing positions inside that range.
        unsafe {
            self.ring.copy_in(pos, &hdr);
            pos += REC_HDR as u64;
            for p in parts {
                self.ring.copy_in(pos, p);
                pos += p.len() as u64;
            }
        }
        self.write = end;
        if flags & LAST != 0 {
            self.published = self.published.wrapping_add(1);
        }
        Ok(true)
    }

    /// Publish everything written since the last commit: one Release store of `write_pos`.
    /// Returns whether anything was published.
    pub(crate) fn commit(&mut self) -> bool {
        if self.write == self.committed {
            return false;
        }
        let p = &self.ring.hdr().producer;
        p.published.store(self.published, Ordering::Relaxed);
        p.write_pos.store(self.write, Ordering::Release);
        self.committed = self.write;
        true
    }

    /// Ask the consumer to wake us when it frees space, then re-check: returns the body
    /// room available after the re-check. If it is still too small, the consumer will see
    /// the flag after its next release (SeqCst fences on both sides: no lost request).
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

    /// Messages committed but not yet consumed.
    pub(crate) fn depth(&self) -> u64 {
        let consumed = self.ring.hdr().consumer.consumed.load(Ordering::Relaxed);
        self.published.saturating_sub(consumed)
    }
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
    cached_write: u64,
    consumed: u64,
    /// `read_pos` was stored by [`Consumer::commit_read`] without the fence and the
    /// want-space check, which the next [`Consumer::release`] still owes.
    unfenced: bool,
}

impl Consumer {
    /// Resume consuming from the stored `read_pos`.
    pub(crate) fn new(ring: RawRing) -> Result<Self, Corrupt> {
        let h = ring.hdr();
        let read = h.consumer.read_pos.load(Ordering::Acquire);
        let write = h.producer.write_pos.load(Ordering::Acquire);
        if read > write || write - read > ring.cap as u64 || read % 8 != 0 {
            return Err(Corrupt);
        }
        let consumed = h.consumer.consumed.load(Ordering::Relaxed);
        Ok(Consumer { ring, read, released: read, cached_write: read, consumed, unfenced: false })
    }

    /// Is anything committed and unread? One Acquire load when the cache says empty.
    pub(crate) fn has_data(&mut self) -> bool {
        if self.read != self.cached_write {
            return true;
        }
        let w = self.ring.hdr().producer.write_pos.load(Ordering::Acquire);
        w != self.read
    }

    /// Look at the next record without consuming it.
    pub(crate) fn peek(&mut self) -> Result<Option<RecordInfo>, Corrupt> {
        if self.read == self.cached_write {
            let w = self.ring.hdr().producer.write_pos.load(Ordering::Acquire);
            if w < self.cached_write || w - self.released > self.ring.cap as u64 || w % 8 != 0 {
                return Err(Corrupt);
            }
            self.cached_write = w;
            if w == self.read {
                return Ok(None);
            }
        }
        let avail = (self.cached_write - self.read) as usize;
        let mut hdr = [0u8; REC_HDR];
        // SAFETY: avail >= 8 (positions are multiples of 8 and differ), and the bytes are
        // committed and not yet released, so the producer does not write them.
        unsafe { self.ring.copy_out(self.read, hdr.as_mut_ptr(), REC_HDR) };
        let len = u32::from_le_bytes(hdr[..4].try_into().expect("4 bytes")) as usize;
        let flags = u32::from_le_bytes(hdr[4..].try_into().expect("4 bytes"));
        if len > self.ring.cap - REC_HDR || record_size(len) > avail || flags & !(FIRST | LAST) != 0 {
            return Err(Corrupt);
        }
        Ok(Some(RecordInfo { len, flags }))
    }

    /// Consume the record `info` (from the last `peek`), copying its body to `dst`
    /// (`dst` must have room for `info.len` bytes) or discarding it when `dst` is None.
    ///
    /// # Safety
    /// `info` must be what the last `peek` returned; `dst`, if any, valid for `info.len`
    /// byte writes.
    pub(crate) unsafe fn consume(&mut self, info: RecordInfo, dst: Option<*mut u8>) {
        if let Some(dst) = dst {
            // SAFETY: peek checked that the whole record is committed and unreleased.
            unsafe { self.ring.copy_out(self.read + REC_HDR as u64, dst, info.len) };
        }
        self.read += record_size(info.len) as u64;
        if info.flags & LAST != 0 {
            self.consumed = self.consumed.wrapping_add(1);
        }
    }

    /// Drop everything committed so far (after [`Corrupt`]): the producer can go on.
    pub(crate) fn skip_all(&mut self) {
        let w = self.ring.hdr().producer.write_pos.load(Ordering::Acquire);
        // Only jump forward, and never past what could be ours.
        if w > self.read && w - self.released <= self.ring.cap as u64 && w % 8 == 0 {
            self.read = w;
        } else {
            // Positions are nonsense; stay where we are, the producer will find the ring
            // full (or corrupt) and count its drops.
            self.read = self.released;
        }
        self.cached_write = self.read;
    }

    /// Give consumed space back to the producer: one Release store of `read_pos`.
    /// Returns true when the producer asked to be woken for space (the caller wakes it).
    pub(crate) fn release(&mut self) -> bool {
        if self.read == self.released && !std::mem::take(&mut self.unfenced) {
            return false;
        }
        self.commit_read();
        self.unfenced = false;
        fence(Ordering::SeqCst);
        let want = &self.ring.hdr().producer.want_space;
        want.load(Ordering::Relaxed) == 1 && want.swap(0, Ordering::AcqRel) == 1
    }

    /// Publish the consumed position now, before the caller runs callbacks on what it
    /// consumed: a successor of a consumer killed inside a callback resumes after that
    /// message and never sees it again. One Release store; the fence and the want-space
    /// check are left to the next [`Consumer::release`].
    pub(crate) fn commit_read(&mut self) {
        if self.read == self.released {
            return;
        }
        let c = &self.ring.hdr().consumer;
        c.consumed.store(self.consumed, Ordering::Relaxed);
        c.read_pos.store(self.read, Ordering::Release);
        self.released = self.read;
        self.unfenced = true;
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

    /// Messages committed but not consumed (statistics).
    pub(crate) fn depth(&self) -> u64 {
        let published = self.ring.hdr().producer.published.load(Ordering::Relaxed);
        published.saturating_sub(self.consumed)
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

    fn pop(c: &mut Consumer) -> Option<(u32, Vec<u8>)> {
        let info = c.peek().unwrap()?;
        let mut v = vec![0u8; info.len];
        // SAFETY: info from peek, v has len bytes.
        unsafe { c.consume(info, Some(v.as_mut_ptr())) };
        Some((info.flags, v))
    }

    #[test]
    fn wrap_around_keeps_every_byte() {
        let r = test_ring(64);
        let mut p = Producer::new(r.raw).unwrap();
        let mut c = Consumer::new(r.raw).unwrap();
        // Odd sizes force bodies to straddle the end of the data area many times.
        for round in 0..200u32 {
            let len = (round as usize * 7) % 41;
            let body: Vec<u8> = (0..len).map(|i| (i as u32 + round) as u8).collect();
            assert!(p.try_write(FIRST | LAST, &[&body[..len / 2], &body[len / 2..]]).unwrap());
            assert!(p.commit());
            let (flags, got) = pop(&mut c).expect("record");
            assert_eq!(flags, FIRST | LAST);
            assert_eq!(got, body, "round {round}");
            assert!(pop(&mut c).is_none());
            c.release();
        }
    }

    #[test]
    fn full_ring_refuses_then_accepts_after_release() {
        let r = test_ring(64);
        let mut p = Producer::new(r.raw).unwrap();
        let mut c = Consumer::new(r.raw).unwrap();
        assert!(p.try_write(FIRST | LAST, &[&[1u8; 24]]).unwrap()); // 32 bytes
        assert!(p.try_write(FIRST | LAST, &[&[2u8; 24]]).unwrap()); // 64 bytes: full
        assert!(!p.try_write(FIRST | LAST, &[&[3u8; 1]]).unwrap());
        p.commit();
        assert_eq!(p.depth(), 2);
        assert_eq!(pop(&mut c).unwrap().1, vec![1u8; 24]);
        // Not released yet: still full for the producer.
        assert!(!p.try_write(FIRST | LAST, &[&[3u8; 1]]).unwrap());
        c.release();
        assert!(p.try_write(FIRST | LAST, &[&[3u8; 1]]).unwrap());
        p.commit();
        assert_eq!(pop(&mut c).unwrap().1, vec![2u8; 24]);
        assert_eq!(pop(&mut c).unwrap().1, vec![3u8; 1]);
    }

    #[test]
    fn uncommitted_records_are_invisible() {
        let r = test_ring(64);
        let mut p = Producer::new(r.raw).unwrap();
        let mut c = Consumer::new(r.raw).unwrap();
        assert!(p.try_write(FIRST | LAST, &[b"abc"]).unwrap());
        assert!(!c.has_data());
        assert!(pop(&mut c).is_none());
        // A "restarted" producer resumes from the committed position: the record is gone.
        let mut p2 = Producer::new(r.raw).unwrap();
        assert!(p2.try_write(FIRST | LAST, &[b"xyz"]).unwrap());
        p2.commit();
        assert_eq!(pop(&mut c).unwrap().1, b"xyz");
        // The first producer's cached view is stale but harmless: it is never used again.
        let _ = p.max_body();
    }

    #[test]
    fn corrupt_positions_are_detected() {
        let r = test_ring(64);
        let mut p = Producer::new(r.raw).unwrap();
        let mut c = Consumer::new(r.raw).unwrap();
        // SAFETY: test-only direct access to the private header.
        let h = unsafe { r.raw.hdr.as_ref() };
        h.producer.write_pos.store(1 << 40, Ordering::Release);
        assert_eq!(c.peek(), Err(Corrupt));
        h.producer.write_pos.store(16, Ordering::Release);
        // A header claiming a body longer than the committed bytes.
        // SAFETY: writes the first 8 data bytes of the private ring.
        unsafe { r.raw.data.as_ptr().cast::<[u8; 8]>().write([200, 0, 0, 0, 3, 0, 0, 0]) };
        assert_eq!(c.peek(), Err(Corrupt));
        c.skip_all();
        assert!(!c.has_data());
        c.release();
        h.consumer.read_pos.store(1 << 50, Ordering::Release);
        assert_eq!(p.refresh(), Err(Corrupt));
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
        assert!(p.try_write(FIRST | LAST, &[&[0u8; 56]]).unwrap());
        p.commit();
        assert_eq!(p.request_space(8).unwrap(), 0);
        pop(&mut c).unwrap();
        assert!(c.release());
        assert!(!c.release());
        assert_eq!(p.body_room(8).unwrap(), 56);
    }
}

#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use loom::thread;
    use std::sync::Arc;

    struct Shared {
        hdr: Box<RingHeader>,
        data: Box<[u8]>,
    }

    fn raw(s: &Shared) -> RawRing {
        RawRing {
            hdr: NonNull::from(&*s.hdr),
            data: NonNull::new(s.data.as_ptr() as *mut u8).unwrap(),
            cap: s.data.len(),
        }
    }

    /// FIFO, no overrun, no record lost or duplicated, with wrap-around and a full ring.
    #[test]
    fn spsc_records_in_order() {
        loom::model(|| {
            let s = Arc::new(Shared { hdr: Box::new(RingHeader::new_for_model()), data: vec![0u8; 32].into() });
            let s2 = s.clone();
            let prod = thread::spawn(move || {
                let mut p = Producer::new(raw(&s2)).unwrap();
                let mut i = 0u8;
                while i < 3 {
                    if p.try_write(FIRST | LAST, &[&[i; 9]]).unwrap() {
                        p.commit();
                        i += 1;
                    } else {
                        thread::yield_now();
                    }
                }
            });
            let mut c = Consumer::new(raw(&s)).unwrap();
            let mut got = 0u8;
            while got < 3 {
                match c.peek().unwrap() {
                    Some(info) => {
                        assert_eq!(info.len, 9);
                        let mut v = [0u8; 9];
                        // SAFETY: info from peek; v holds 9 bytes.
                        unsafe { c.consume(info, Some(v.as_mut_ptr())) };
                        assert_eq!(v, [got; 9]);
                        got += 1;
                        c.release();
                    }
                    None => thread::yield_now(),
                }
            }
            prod.join().unwrap();
            assert_eq!(c.peek().unwrap(), None);
        });
    }

    /// The want-space handshake never loses a request: if the producer stopped because the
    /// ring was full, the consumer's release either made space visible to the producer's
    /// re-check, or returned true (the consumer will wake the producer).
    #[test]
    fn want_space_no_lost_request() {
        loom::model(|| {
            let s = Arc::new(Shared { hdr: Box::new(RingHeader::new_for_model()), data: vec![0u8; 16].into() });
            let mut p = Producer::new(raw(&s)).unwrap();
            assert!(p.try_write(FIRST | LAST, &[&[7u8; 8]]).unwrap());
            p.commit();
            let s2 = s.clone();
            let cons = thread::spawn(move || {
                let mut c = Consumer::new(raw(&s2)).unwrap();
                let info = c.peek().unwrap().unwrap();
                // SAFETY: discard the record from peek.
                unsafe { c.consume(info, None) };
                c.release()
            });
            let room = p.request_space(8).unwrap();
            let woken = cons.join().unwrap();
            assert!(room >= 8 || woken, "producer waits for space and nobody will wake it");
        });
    }
}
