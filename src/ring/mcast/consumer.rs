//! The reading end of a broadcast ring: seqlock-style validation against `floor`, resync
//! after a lap, and the exact count of what a lap lost (protocol in the parent module).

use super::{BodyBuf, MC_HDR, RawMcast, max_body, record_size, stamp, unmeta, usable, widen};
use crate::ring::Corrupt;
use crate::sync::{Ordering, fence};

/// What [`Consumer::read`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Read {
    /// A record for this reader (its sequence number), body in the buffer.
    Record(u64),
    /// A record for another reader, skipped (its sequence number).
    Skipped(u64),
    /// Nothing new is committed.
    Empty,
    /// Diverting mode: `floor` passed this reader; nothing was consumed.
    Lapped,
}

/// Reader `idx` of a broadcast ring. One per cursor in the whole system (the reading slot's
/// lock).
pub(crate) struct Consumer {
    ring: RawMcast,
    idx: usize,
    /// Position of the next record to read.
    read: u64,
    /// Last `read_pos` stored.
    released: u64,
    /// Sequence number expected at `read` (while `resync`, the one expected before the lap).
    next_seq: u64,
    /// Lapped: `read` was moved to `floor`; the next intact record's `seq` tells the loss.
    resync: bool,
    /// Just attached: the first intact record read at the stored position gives `next_seq`
    /// (the stored one may be one batch ahead, module docs).
    fresh: bool,
    /// Diverting mode: a lap is not resolved here but reported ([`Read::Lapped`]).
    stop_on_lap: bool,
    /// Messages lost to laps and not yet taken.
    lost: u64,
    /// Times lapped (statistics).
    laps: u64,
    /// Cumulative loss stored in the cursor line (statistics).
    lost_total: u64,
}

impl Consumer {
    /// Resume reading as reader `idx` from its cursor line. `Err` when the stored `read_pos`
    /// is unusable (unaligned, implausibly large, or more than one ring past a usable
    /// `floor`: beyond anything the producer can have written).
    pub(crate) fn new(ring: RawMcast, idx: usize) -> Result<Self, Corrupt> {
        if idx >= ring.readers() {
            return Err(Corrupt);
        }
        let c = ring.cursor(idx);
        let read = c.read_pos.load(Ordering::Acquire);
        let next_seq = c.next_seq.load(Ordering::Relaxed);
        let floor = ring.prod().floor.load(Ordering::Acquire);
        if !usable(read) || (usable(floor) && read > floor + ring.cap as u64) {
            return Err(Corrupt);
        }
        Ok(Consumer {
            ring,
            idx,
            read,
            released: read,
            next_seq,
            resync: false,
            fresh: true,
            stop_on_lap: false,
            lost: 0,
            laps: c.laps.load(Ordering::Relaxed),
            lost_total: c.lost.load(Ordering::Relaxed),
        })
    }

    /// [`Consumer::new`] for a reader whose stored cursor is unusable (corrupt shared
    /// memory): its cursor is first moved to `floor` (with `floor_seq`), so it reads from the
    /// oldest intact record on. `Err` only if `floor` itself is unusable.
    pub(crate) fn repaired(ring: RawMcast, idx: usize) -> Result<Self, Corrupt> {
        if idx >= ring.readers() {
            return Err(Corrupt);
        }
        let floor = ring.prod().floor.load(Ordering::Acquire);
        if !usable(floor) {
            return Err(Corrupt);
        }
        let c = ring.cursor(idx);
        c.next_seq.store(ring.prod().floor_seq.load(Ordering::Relaxed), Ordering::Relaxed);
        c.read_pos.store(floor, Ordering::Release);
        Self::new(ring, idx)
    }

    /// The record at `read` may have been overwritten: if `floor` says so, jump to it and
    /// return true. Call after an Acquire load or fence that follows the loads to validate.
    fn lapped(&mut self) -> Result<bool, Corrupt> {
        let floor = self.ring.prod().floor.load(Ordering::Relaxed);
        if floor <= self.read {
            return Ok(false);
        }
        if !usable(floor) {
            return Err(Corrupt);
        }
        if self.stop_on_lap {
            // The caller learns it (`Read::Lapped`) and goes where the producer sent it.
            fence(Ordering::Acquire);
            return Ok(true);
        }
        self.read = floor;
        self.resync = true;
        self.laps += 1;
        Ok(true)
    }

    /// Read the next record into `buf` (resized to its body): its sequence number, or `None`
    /// when nothing new is committed. A lap on the way is resolved here (the loss is added to
    /// what [`Consumer::take_lost`] reports). Only validated, intact records are delivered.
    pub(crate) fn next(&mut self, buf: &mut impl BodyBuf) -> Result<Option<u64>, Corrupt> {
        loop {
            match self.read(buf)? {
                Read::Record(seq) => return Ok(Some(seq)),
                Read::Skipped(_) => continue,
                Read::Empty => return Ok(None),
                Read::Lapped => unreachable!("not in diverting mode"),
            }
        }
    }

    /// Diverting mode (the per-publisher topology of `transport/shm.rs`): a lap is reported as
    /// [`Read::Lapped`] and not resolved (the producer handed this reader's unread records
    /// elsewhere first), and [`Consumer::seek`] moves the reader.
    pub(crate) fn set_stop_on_lap(&mut self) {
        self.stop_on_lap = true;
    }

    /// Position of the next record to read.
    pub(crate) fn position(&self) -> u64 {
        self.read
    }

    /// Continue at `pos` with sequence number `seq` (a resume marker's), storing the cursor.
    /// `Err` for a position no producer can have given.
    pub(crate) fn seek(&mut self, pos: u64, seq: u64) -> Result<(), Corrupt> {
        if !usable(pos) {
            return Err(Corrupt);
        }
        self.read = pos;
        self.next_seq = seq;
        self.resync = false;
        self.fresh = false;
        let c = self.ring.cursor(self.idx);
        c.next_seq.store(seq, Ordering::Relaxed);
        c.read_pos.store(pos, Ordering::Release);
        self.released = pos;
        Ok(())
    }

    /// The stamp word at the read position as it is now (Acquire): what a reader that found
    /// the ring corrupt there compares against, to stay quiet until the producer writes again.
    pub(crate) fn stamp_word(&self) -> u64 {
        self.ring.word(self.ring.off(self.read)).load(Ordering::Acquire)
    }

    /// Whether a record is committed at the read position (one Acquire load; a lap shows as
    /// data, which the read then resolves).
    pub(crate) fn has_data(&self) -> bool {
        let s = self.ring.word(self.ring.off(self.read)).load(Ordering::Acquire);
        s == stamp(self.read) || !self.ring.empty_stamp(s, self.read)
    }

    /// Read the next record into `buf` (resized to its body) if it is for this reader; see
    /// [`Read`]. Only validated, intact records are returned.
    pub(crate) fn read(&mut self, buf: &mut impl BodyBuf) -> Result<Read, Corrupt> {
        loop {
            let read = self.read;
            let off = self.ring.off(read);
            let s = self.ring.word(off).load(Ordering::Acquire);
            if s != stamp(read) {
                // The Acquire load above orders the floor load after it: a stamp word the
                // producer changed after raising floor shows the raised floor.
                if self.lapped()? {
                    if self.stop_on_lap {
                        return Ok(Read::Lapped);
                    }
                    continue;
                }
                return if self.ring.empty_stamp(s, read) { Ok(Read::Empty) } else { Err(Corrupt) };
            }
            let (len, dest, seq_lo) = unmeta(self.ring.word(off + 8).load(Ordering::Relaxed));
            let seq = widen(self.next_seq, seq_lo);
            let sane = len <= max_body(self.ring.cap) && dest <= self.ring.readers() as u64;
            let mine = dest == 0 || dest == self.idx as u64 + 1;
            if sane {
                self.ring.prefetch(read + record_size(len) as u64);
            }
            if sane && mine {
                self.ring.copy_out(read + MC_HDR as u64, buf.sized(len));
            }
            // Validation: every load above happens before this fence; a producer store they
            // saw that was made after a floor raise shows that raise to the load below.
            fence(Ordering::Acquire);
            if self.lapped()? {
                if self.stop_on_lap {
                    return Ok(Read::Lapped);
                }
                continue;
            }
            if !sane {
                return Err(Corrupt);
            }
            if self.resync {
                // Just attached, a stored `next_seq` may be ahead of the stored `read_pos` (the
                // reader died between its two cursor stores): not a violation then.
                if seq < self.next_seq && !self.fresh {
                    return Err(Corrupt);
                }
                let lost = seq.saturating_sub(self.next_seq);
                self.lost = self.lost.saturating_add(lost);
                self.lost_total = self.lost_total.saturating_add(lost);
                let c = self.ring.cursor(self.idx);
                c.lost.store(self.lost_total, Ordering::Relaxed);
                c.laps.store(self.laps, Ordering::Relaxed);
                self.resync = false;
            } else if seq != self.next_seq && !(self.fresh && seq < self.next_seq) {
                // Just attached: a stored `next_seq` at most one batch ahead is adopted.
                return Err(Corrupt);
            }
            self.fresh = false;
            self.next_seq = seq.checked_add(1).ok_or(Corrupt)?;
            self.read = read + record_size(len) as u64;
            return Ok(if mine { Read::Record(seq) } else { Read::Skipped(seq) });
        }
    }

    /// Store the cursor (`next_seq`, then `read_pos` with Release): the producer sees this
    /// reader's progress at its next scan, and a successor resumes here. Nothing is stored
    /// while a resync is pending (the stored position stays below `floor`: still lapped).
    pub(crate) fn release(&mut self) {
        if self.resync || self.read == self.released {
            return;
        }
        let c = self.ring.cursor(self.idx);
        c.next_seq.store(self.next_seq, Ordering::Relaxed);
        c.read_pos.store(self.read, Ordering::Release);
        self.released = self.read;
    }

    /// Messages lost to laps since the last call.
    pub(crate) fn take_lost(&mut self) -> u64 {
        std::mem::take(&mut self.lost)
    }

    /// Times this reader was lapped (statistics).
    pub(crate) fn laps(&self) -> u64 {
        self.laps
    }

    /// Sequence number expected next.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }
}
