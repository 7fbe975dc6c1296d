//! The reading end of a broadcast ring: seqlock-style validation against `floor`, resync
//! after a lap, and the exact count of what a lap lost (protocol in the parent module).

use super::{MC_HDR, RawMcast, max_body, record_size, stamp, usable};
use crate::ring::Corrupt;
use crate::sync::{Ordering, fence};

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
            lost: 0,
            laps: c.laps.load(Ordering::Relaxed),
            lost_total: c.lost.load(Ordering::Relaxed),
        })
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
        self.read = floor;
        self.resync = true;
        self.laps += 1;
        Ok(true)
    }

    /// Read the next record into `buf` (resized to its body): its sequence number, or `None`
    /// when nothing new is committed. A lap on the way is resolved here (the loss is added to
    /// what [`Consumer::take_lost`] reports). Only validated, intact records are delivered.
    pub(crate) fn next(&mut self, buf: &mut Vec<u8>) -> Result<Option<u64>, Corrupt> {
        loop {
            let read = self.read;
            let off = self.ring.off(read);
            let s = self.ring.word(off).load(Ordering::Acquire);
            if s != stamp(read) {
                // The Acquire load above orders the floor load after it: a stamp word the
                // producer changed after raising floor shows the raised floor.
                if self.lapped()? {
                    continue;
                }
                return if self.ring.empty_stamp(s, read) { Ok(None) } else { Err(Corrupt) };
            }
            let w = self.ring.word(off + 8).load(Ordering::Relaxed);
            let seq = self.ring.word(off + 16).load(Ordering::Relaxed);
            let len = (w & 0xffff_ffff) as usize;
            let sane = len <= max_body(self.ring.cap) && w >> 32 == 0;
            if sane {
                buf.resize(len, 0);
                self.ring.copy_out(read + MC_HDR as u64, buf);
            }
            // Validation: every load above happens before this fence; a producer store they
            // saw that was made after a floor raise shows that raise to the load below.
            fence(Ordering::Acquire);
            if self.lapped()? {
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
            return Ok(Some(seq));
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
