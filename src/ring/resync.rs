//! Resynchronization of a ring whose shared state is impossible (issue 11, items 1-2): the
//! positions either side can start from, the walk over stamped records both ends use when
//! they start, and the consumer's quarantine of a ring holding an impossible record.

use super::*;

/// A position a side can start from: a multiple of [`REC_ALIGN`], and far enough from
/// `u64::MAX` that a ring's worth of records after it cannot overflow.
pub(super) fn usable_pos(pos: u64, cap: u64) -> bool {
    pos % REC_ALIGN as u64 == 0 && pos <= u64::MAX - 4 * cap
}

/// Walk the stamped records from `pos` (the producer can only have written below
/// `read + cap`): (end of the last valid one, messages ended on the way, whether the walk
/// stopped at an impossible record rather than at an empty slot).
pub(super) fn walk(ring: &RawRing, mut pos: u64, read: u64) -> (u64, u64, bool) {
    let mut n = 0u64;
    loop {
        match ring.read_hdr(pos) {
            Ok(None) => return (pos, n, false),
            Err(Corrupt) => return (pos, n, true),
            Ok(Some(rec)) => match record_end(ring, &rec, pos, read) {
                Ok(end) => {
                    n += u64::from(rec.flags & LAST != 0);
                    pos = end;
                }
                Err(Corrupt) => return (pos, n, true),
            },
        }
    }
}

/// What a quarantined consumer last saw of its ring: the two header words of the slot at
/// its read position and the producer's `write_pos` hint. The ring is treated as empty
/// until one of them changes (see [`Consumer::quarantine`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Snapshot {
    pub stamp: u64,
    pub hdr: u64,
    pub hint: u64,
}

impl Consumer {
    /// Quarantine the ring after [`Corrupt`] at the read position: it is treated as empty
    /// (no report, no spin: [`Consumer::has_data`] is false) until its producer writes
    /// again, seen as a change of the slot's header words (a restarted producer clears the
    /// stamp, a live one writes its record there) or of the `write_pos` hint. A new hint
    /// that is a plausible position past us (aligned, within a ring of our released
    /// position) is adopted, and the messages skipped are reported by
    /// [`Consumer::take_lost`]; after any other change the read position is tried again.
    /// Returns true when this corruption starts an episode, i.e. a record was consumed since
    /// the last one: the caller reports it (once per episode, however often the same bad
    /// state is met again).
    pub(crate) fn quarantine(&mut self) -> bool {
        self.read = self.released;
        self.quarantined = Some(self.snapshot());
        !std::mem::replace(&mut self.episode, true)
    }

    fn snapshot(&self) -> Snapshot {
        let off = self.ring.off(self.read);
        Snapshot {
            stamp: self.ring.word(off).load(Ordering::Acquire),
            hdr: self.ring.word(off + 8).load(Ordering::Relaxed),
            hint: self.ring.hdr().producer.write_pos.load(Ordering::Acquire),
        }
    }

    /// While quarantined: whether something changed (then the quarantine is lifted and the
    /// read position, possibly moved to the new hint, is worth a look).
    pub(super) fn leave_quarantine(&mut self) -> bool {
        let Some(q) = self.quarantined else { return true };
        let now = self.snapshot();
        if now == q {
            return false;
        }
        self.quarantined = None;
        let w = now.hint;
        if (now.stamp, now.hdr) == (q.stamp, q.hdr)
            && w > self.read
            && w % REC_ALIGN as u64 == 0
            && w - self.released <= self.ring.cap as u64
        {
            let published = self.ring.hdr().producer.published.load(Ordering::Relaxed);
            let gap = published.saturating_sub(self.consumed).min((w - self.read) / REC_ALIGN as u64);
            self.gap = self.gap.saturating_add(gap);
            self.consumed = self.consumed.wrapping_add(gap);
            self.read = w;
            self.commit_read();
        }
        true
    }
}
